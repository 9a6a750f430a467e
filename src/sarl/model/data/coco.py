"""MS-COCO instances annotations as multi-label data.

A category is present in an image when any of its instance annotations (crowd ones included)
lies in it. Categories follow COCO id order (1 person ... 90 toothbrush, 80 in all) with the
names from the JSON file. As in the multi-label literature (ML-GCN, ASL, DualCoOp: 82,081
train / 40,137 val images for 2014), images without any annotation are left out unless
``include_empty=True``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import MultiLabelDataset, check_on_bad_image


def build_coco(
    root: str | Path,
    split: str,
    transform: Callable[..., Any] | None = None,
    categories: Sequence[str] | None = None,
    on_bad_image: str = "error",
    annotation_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    year: str = "2014",
    include_empty: bool = False,
) -> MultiLabelDataset:
    """Build a COCO data set from ``annotations/instances_{split}{year}.json`` and ``{split}{year}/``.

    Args:
        root: the COCO folder (holding ``annotations/`` and the image folders).
        split: ``train`` or ``val`` (any name whose files exist).
        categories: a subset of the JSON's category names, in the column order wanted;
            default all of them in COCO id order.
        annotation_file: explicit instances JSON (overrides the default path).
        image_dir: explicit image folder (overrides ``root/{split}{year}``).
        include_empty: keep images that have no annotation (all labels 0).

    Images are ordered by COCO image id.
    """
    check_on_bad_image(on_bad_image)
    root = Path(root)
    ann_path = Path(annotation_file) if annotation_file is not None else (
        root / "annotations" / f"instances_{split}{year}.json"
    )
    img_dir = Path(image_dir) if image_dir is not None else root / f"{split}{year}"
    if not ann_path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_path}")
    with open(ann_path, encoding="utf-8") as f:
        data = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{ann_path} is not a COCO instances file: no {key!r} key")

    coco_cats = sorted(data["categories"], key=lambda c: c["id"])
    name_by_id = {c["id"]: c["name"] for c in coco_cats}
    if categories is None:
        cats = [c["name"] for c in coco_cats]
    else:
        cats = list(categories)
        missing = sorted(set(cats) - set(name_by_id.values()))
        if missing:
            raise ValueError(f"categories not in {ann_path}: {', '.join(missing)}")
    col_by_name = {name: i for i, name in enumerate(cats)}
    col_by_cat_id = {cid: col_by_name[name] for cid, name in name_by_id.items() if name in col_by_name}

    images = sorted(data["images"], key=lambda im: im["id"])
    row_by_image_id = {im["id"]: i for i, im in enumerate(images)}
    labels = np.zeros((len(images), len(cats)), dtype=np.int8)
    annotated = np.zeros(len(images), dtype=bool)
    for ann in data["annotations"]:
        row = row_by_image_id.get(ann["image_id"])
        if row is None:
            continue
        annotated[row] = True
        col = col_by_cat_id.get(ann["category_id"])
        if col is not None:
            labels[row, col] = 1

    keep = np.ones(len(images), dtype=bool) if include_empty else annotated
    paths = [img_dir / images[i]["file_name"] for i in np.flatnonzero(keep)]
    return MultiLabelDataset(paths, labels[keep], cats, transform, on_bad_image)
