"""Pascal VOC XML annotations as multi-label data: the VOCdevkit layout and plain folders.

Two layouts are read:

* VOCdevkit: ``root/VOC2007/{JPEGImages, Annotations, ImageSets/Main/{split}.txt}``, with
  ``root`` either the ``VOCdevkit`` folder or the ``VOC2007`` folder itself; the 20 standard
  classes unless ``categories`` are given.
* A plain folder of XML files beside their images (what labelImg writes), e.g.
  ``cards_voc/train/IMG_2385.JPG`` + ``IMG_2385.xml``; ``root/split`` when that folder exists,
  else ``root`` itself. The image is the XML's ``<filename>`` in the same folder, or else a
  file with the XML's stem and any image extension. Categories are the sorted set of names
  found, unless given.

Difficult objects: a class whose every object in an image is marked ``difficult``. In evaluation
splits (``val``, ``test``) the option ``difficult`` (``data.options.difficult``) chooses its label:
``"unknown"`` (-1, the default), so that metrics skip it as the VOC07 devkit ignores difficult
objects; or ``"absent"`` (0), as DualCoOp (``dataloaders/pascal_voc.py``) and HCP-MLR-PL
(``datasets/voc2007.py``) read the test set: they skip difficult objects in every split, and the
peers' tables (SARL.md) were scored that way. In training splits such a class is always 0 (absent),
as both peers train, whatever the option says. Every VOC data set records the convention its labels
follow as its attribute ``difficult`` (``"unknown"`` or ``"absent"``), so tables can report it.

Word vectors. Three VOC class names are not words (``diningtable``, ``pottedplant``,
``tvmonitor``); :data:`VOC_WORDS` gives the words GloVe or word2vec know them by, and the
experiment uses it for VOC jobs (``data.words`` adds or overrides entries).
Object names are used as written (only surrounding spaces are stripped); names not among the
categories are ignored, with one warning listing them.
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import MultiLabelDataset, check_on_bad_image

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# What to look up in word vectors for VOC's class names that are not words (Category.words).
VOC_WORDS: dict[str, str] = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
EVAL_SPLITS = ("val", "test")
DIFFICULT_POLICIES = ("unknown", "absent")  # the label of difficult-only classes in evaluation splits
_DIFFICULT_LABELS = {"unknown": -1, "absent": 0}


def parse_voc_xml(path: str | Path) -> tuple[str, list[tuple[str, bool]]]:
    """Read one VOC annotation file.

    Returns:
        ``(filename, objects)``: the ``<filename>`` text ("" when absent) and one
        ``(name, difficult)`` pair per ``<object>``, in file order.

    Raises:
        ValueError: the file is not well-formed XML or an object has no name (message names the file).
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"cannot parse VOC annotation {path}: {exc}") from exc
    filename = (root.findtext("filename") or "").strip()
    objects: list[tuple[str, bool]] = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise ValueError(f"VOC annotation {path} has an <object> without a <name>")
        difficult = (obj.findtext("difficult") or "0").strip()
        objects.append((name, difficult in ("1", "true", "True")))
    return filename, objects


def labels_from_objects(
    objects: Sequence[tuple[str, bool]], index: dict[str, int], difficult_label: int, ignored: set[str]
) -> np.ndarray:
    """One label row from ``(name, difficult)`` pairs; names outside ``index`` are added to ``ignored``."""
    row = np.zeros(len(index), dtype=np.int8)
    for name, difficult in objects:
        col = index.get(name)
        if col is None:
            ignored.add(name)
        elif not difficult:
            row[col] = 1
        elif row[col] == 0:  # difficult only so far; a non-difficult object of the class wins
            row[col] = difficult_label
    return row


def check_difficult(difficult: Any) -> str:
    """``difficult`` itself if it is one of :data:`DIFFICULT_POLICIES`; else a ValueError naming the option."""
    if difficult not in DIFFICULT_POLICIES:
        raise ValueError(f"data.options.difficult: {difficult!r} is not one of {', '.join(DIFFICULT_POLICIES)} "
                         "(the label of VOC classes seen only as difficult objects in evaluation splits)")
    return difficult


def difficult_policy_for(split: str, difficult: str) -> str:
    """The convention a split's labels follow: ``difficult`` in evaluation splits, ``"absent"`` in training."""
    check_difficult(difficult)
    return difficult if split in EVAL_SPLITS else "absent"


def find_image_for_xml(xml_path: Path, filename: str) -> Path | None:
    """The image an XML file describes: its ``<filename>`` beside it, else same stem + an image extension."""
    if filename:
        candidate = xml_path.parent / Path(filename.replace("\\", "/")).name
        if candidate.is_file():
            return candidate
    for sibling in sorted(xml_path.parent.glob(f"{xml_path.stem}.*")):
        if sibling.suffix.lower() in IMAGE_EXTENSIONS and sibling.is_file():
            return sibling
    return None


def _devkit_dir(root: Path, year: str) -> Path | None:
    """``root/VOC{year}`` or ``root`` itself when it looks like a VOC year folder, else None."""
    for candidate in (root / f"VOC{year}", root):
        if (candidate / "Annotations").is_dir() and (candidate / "ImageSets" / "Main").is_dir():
            return candidate
    return None


def _warn_ignored(ignored: set[str], where: Path) -> None:
    if ignored:
        warnings.warn(f"VOC annotations in {where} name categories not in the category list, ignored: "
                      f"{', '.join(sorted(ignored))}", stacklevel=4)  # point at build_voc's caller


def build_voc(
    root: str | Path,
    split: str,
    transform: Callable[..., Any] | None = None,
    categories: Sequence[str] | None = None,
    on_bad_image: str = "error",
    year: str = "2007",
    difficult: str = "unknown",
) -> MultiLabelDataset:
    """Build a VOC data set from a VOCdevkit tree or a plain folder of XML files (module docstring).

    Args:
        root: VOCdevkit, VOC2007, or a folder holding ``split/`` (or the XML files themselves).
        split: image set name (``trainval``, ``test``, ...) or sub-folder name (``train``, ``test``).
        categories: category names in column order; default VOC's 20 (devkit) or the sorted names found.
        year: VOC year folder looked for under a VOCdevkit root.
        difficult: label of difficult-only classes in ``val``/``test``: ``unknown`` (-1) or ``absent`` (0);
            training splits always read them as absent. The data set's ``difficult`` attribute records which.
    """
    check_on_bad_image(on_bad_image)
    root = Path(root)
    policy = difficult_policy_for(split, difficult)
    devkit = _devkit_dir(root, year)
    ds = None
    if devkit is not None:
        ds = _build_devkit(devkit, split, transform, categories, on_bad_image, _DIFFICULT_LABELS[policy])
    else:
        for folder in (root / split, root):
            if folder.is_dir() and any(folder.glob("*.xml")):
                ds = _build_folder(folder, transform, categories, on_bad_image, _DIFFICULT_LABELS[policy])
                break
    if ds is not None:
        ds.difficult = policy  # kept by with_labels / subset / with_transform (shallow copies)
        return ds
    raise FileNotFoundError(
        f"no VOC data under {root}: expected VOC{year}/{{Annotations,ImageSets/Main}} (VOCdevkit), "
        f"Annotations + ImageSets/Main (VOC{year} folder), or XML files in {root / split} or {root}"
    )


def _build_devkit(
    devkit: Path,
    split: str,
    transform: Callable[..., Any] | None,
    categories: Sequence[str] | None,
    on_bad_image: str,
    difficult_label: int,
) -> MultiLabelDataset:
    list_file = devkit / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        available = sorted(p.stem for p in (devkit / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise FileNotFoundError(f"no image set {list_file}; available splits: {', '.join(available) or 'none'}")
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    cats = list(categories) if categories is not None else list(VOC_CLASSES)
    index = {name: i for i, name in enumerate(cats)}
    ignored: set[str] = set()
    paths, rows = [], []
    for image_id in ids:
        _, objects = parse_voc_xml(devkit / "Annotations" / f"{image_id}.xml")
        rows.append(labels_from_objects(objects, index, difficult_label, ignored))
        paths.append(devkit / "JPEGImages" / f"{image_id}.jpg")
    _warn_ignored(ignored, devkit)
    labels = np.stack(rows) if rows else np.zeros((0, len(cats)), dtype=np.int8)
    return MultiLabelDataset(paths, labels, cats, transform, on_bad_image)


def _build_folder(
    folder: Path,
    transform: Callable[..., Any] | None,
    categories: Sequence[str] | None,
    on_bad_image: str,
    difficult_label: int,
) -> MultiLabelDataset:
    parsed: list[tuple[Path, list[tuple[str, bool]]]] = []
    for xml_path in sorted(folder.glob("*.xml")):
        filename, objects = parse_voc_xml(xml_path)
        image = find_image_for_xml(xml_path, filename)
        if image is None:
            message = f"no image found for VOC annotation {xml_path} (filename {filename!r})"
            if on_bad_image == "error":
                raise FileNotFoundError(message)
            warnings.warn(message + "; skipped", stacklevel=3)
            continue
        parsed.append((image, objects))
    if categories is None:
        cats = sorted({name for _, objects in parsed for name, _ in objects})
    else:
        cats = list(categories)
    index = {name: i for i, name in enumerate(cats)}
    ignored: set[str] = set()
    rows = [labels_from_objects(objects, index, difficult_label, ignored) for _, objects in parsed]
    _warn_ignored(ignored, folder)
    labels = np.stack(rows) if rows else np.zeros((0, len(cats)), dtype=np.int8)
    return MultiLabelDataset([image for image, _ in parsed], labels, cats, transform, on_bad_image)
