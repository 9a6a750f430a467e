"""A Label Studio JSON export as a data set (``data.kind: label_studio``): what teams already annotated there.

The file is what Label Studio's "Export > JSON" gives: a list of tasks, each with ``data`` (the image reference)
and ``annotations[].result[].value.choices``. Two shapes of question are read, as ``sarl annotate push`` asks
them (``sarl.platform.annotate``) and as most image-classification projects do:

- **one question per image and category** (a ``Choices`` control named ``answer``, the category in
  ``data.category``): ``present`` -> 1, ``absent`` -> 0, ``can't tell`` -> unknown;
- **the categories as choices** (any other ``Choices`` control): every ticked category is present, every other
  category of the data set is absent, since the annotator saw the whole list.

A category a task never answered is unknown (-1), as is every entry of an image whose tasks have no submitted
annotation. The latest submitted annotation of a task counts (skipped ones, ``was_cancelled``, do not); tasks of
one image are merged into one row, a later task's answer winning over an earlier one's.

Images: ``data[image_key]`` (default ``image``), resolved as Label Studio names files: ``/data/local-files/?d=REL``
-> ``image_root/REL`` (``image_root``: Label Studio's ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``), ``/data/upload/
REL`` -> ``image_root/upload/REL`` (its media folder), an absolute path as it is, a relative one against the
export's folder (and ``image_root`` when given). Remote references (``s3://``, ``http(s)://``) are refused with a
message: this library reads local files only; download them first or use ``image_key: path`` when the tasks keep a
local path (``sarl annotate push`` keeps the image's URI in ``data.path``).

The export file is ``root`` itself, or ``root/{split}.json``, else ``root/export.json``; ``export`` names it
explicitly. Categories are the given list (names outside it are refused, naming the task), else the sorted union
of every category answered.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from .datasets import MultiLabelDataset, check_on_bad_image

ANSWER_CONTROL = "answer"
ANSWERS = {"present": 1, "absent": 0, "can't tell": -1}


def find_export(root: str | Path, split: str) -> Path:
    """``root`` when it is a file, else ``root/{split}.json``, else ``root/export.json``."""
    root = Path(root)
    if root.is_file():
        return root
    candidates = [root / f"{split}.json", root / "export.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no Label Studio export found: looked for {', '.join(map(str, candidates))}")


def resolve_image(ref: str, export: Path, image_root: str | Path | None, task_id: Any) -> Path:
    """The local file a task's image reference names (see the module doc)."""
    root = Path(image_root) if image_root is not None else None
    if ref.startswith("/data/local-files/"):
        rel = parse_qs(urlparse(ref).query).get("d", [""])[0]
        if root is None:
            raise ValueError(f"task {task_id}: image {ref!r} is served by Label Studio's local-files storage; give "
                             f"data.options.image_root (its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")
        return root / rel
    if ref.startswith("/data/upload/"):
        if root is None:
            raise ValueError(f"task {task_id}: image {ref!r} was uploaded to Label Studio; give "
                             f"data.options.image_root (its data folder's media directory)")
        return root / "upload" / unquote(ref[len("/data/upload/"):])
    if "://" in ref:
        raise ValueError(f"task {task_id}: image {ref!r} is remote; this data set reads local files (download "
                         f"them, or set data.options.image_key to a key holding a local path)")
    path = Path(ref)
    return path if path.is_absolute() else (root or export.parent) / path


def task_answers(task: dict[str, Any], category_key: str = "category") -> tuple[dict[str, int], bool]:
    """``({category: 1 | 0 | -1}, whole_list)`` of a task's latest submitted annotation; ``whole_list`` when the
    categories were the choices (every other category is then absent)."""
    annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not annotations:
        return {}, False
    latest = max(annotations, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id", 0)))
    answers: dict[str, int] = {}
    whole_list = False
    for item in latest.get("result") or []:
        choices = (item.get("value") or {}).get("choices")
        if choices is None:
            continue
        if item.get("from_name") == ANSWER_CONTROL:
            category = (task.get("data") or {}).get(category_key)
            if not isinstance(category, str) or len(choices) != 1 or choices[0] not in ANSWERS:
                raise ValueError(f"task {task.get('id')}: an {ANSWER_CONTROL!r} answer needs data.{category_key} and "
                                 f"one of {list(ANSWERS)}, got {choices}")
            answers[category] = ANSWERS[choices[0]]
        else:
            whole_list = True
            answers.update({name: 1 for name in choices})
    if not latest.get("result") and (task.get("data") or {}).get(category_key) is None:
        whole_list = True  # an empty submission of a list question: nothing is present
    return answers, whole_list


def read_export(path: str | Path, categories: Sequence[str] | None = None, image_key: str = "image",
                category_key: str = "category", image_root: str | Path | None = None,
                ) -> tuple[list[Path], np.ndarray, list[str]]:
    """``(image paths, N x C labels in {1, 0, -1}, categories)`` of an export, one row per image."""
    path = Path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a Label Studio JSON export: {exc}") from None
    if not isinstance(tasks, list):
        raise ValueError(f"{path}: a Label Studio JSON export is a list of tasks")
    images = []
    for task in tasks:
        data = task.get("data") or {}
        if not isinstance(data.get(image_key), str):
            raise ValueError(f"{path}: task {task.get('id')} has no data.{image_key}")
        images.append(resolve_image(data[image_key], path, image_root, task.get("id")))
    rows: dict[Path, dict[str, int]] = {image: {} for image in images}  # in the export's order
    whole: dict[Path, bool] = {}

    def answered_at(i: int) -> str:
        return max([a.get("updated_at") or "" for a in tasks[i].get("annotations") or []] or [""])

    for i in sorted(range(len(tasks)), key=answered_at):  # later answers overwrite earlier ones
        task, image = tasks[i], images[i]
        answers, whole_list = task_answers(task, category_key)
        if categories is not None and set(answers) - set(categories):
            raise ValueError(f"{path}: task {task.get('id')} answers {sorted(set(answers) - set(categories))}, "
                             f"not in the categories {list(categories)}")
        rows[image].update(answers)
        whole[image] = whole.get(image, False) or whole_list
    cats = list(categories) if categories is not None else sorted({c for r in rows.values() for c in r})
    labels = np.full((len(rows), len(cats)), -1, dtype=np.int8)
    for i, (image, answers) in enumerate(rows.items()):
        for j, name in enumerate(cats):
            labels[i, j] = answers.get(name, 0 if whole[image] else -1)
    return list(rows), labels, cats


def build_label_studio(
    root: str | Path,
    split: str,
    transform: Callable[..., Any] | None = None,
    categories: Sequence[str] | None = None,
    on_bad_image: str = "error",
    export: str | Path | None = None,
    image_key: str = "image",
    category_key: str = "category",
    image_root: str | Path | None = None,
) -> MultiLabelDataset:
    """A data set from a Label Studio JSON export (see the module doc for the options)."""
    check_on_bad_image(on_bad_image)
    path = Path(export) if export is not None else find_export(root, split)
    images, labels, cats = read_export(path, categories, image_key, category_key, image_root)
    return MultiLabelDataset(images, labels, cats, transform, on_bad_image)
