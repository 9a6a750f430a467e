"""Any folder of images described by a manifest file (JSONL or CSV).

JSONL, one object per line::

    {"path": "img/0001.jpg", "labels": ["cat", "sofa"], "unknown": ["dog"]}

``labels`` lists the categories present; ``unknown`` (optional) those whose presence is not
known (-1); every other category is absent (0).

CSV, with a header row holding ``path`` and ``labels`` (and optionally ``unknown``) columns;
names within a cell are separated by ``;`` or ``|``::

    path,labels
    img/0001.jpg,cat;sofa

Relative paths are relative to the manifest's folder. Categories are the given list (names
outside it are ignored with one warning), else the sorted union of all names found.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import MultiLabelDataset, check_on_bad_image

MANIFEST_SUFFIXES = (".jsonl", ".csv")


@dataclass
class ManifestRow:
    """One manifest entry: an image path and the category names present or unknown."""

    path: str
    labels: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def _split_names(cell: str | None) -> list[str]:
    return [name.strip() for name in re.split(r"[;|]", cell or "") if name.strip()]


def _as_names(value: Any, where: str, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return _split_names(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ValueError(f"{where}: {key!r} must be a list of category names, got {value!r}")


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Parse a ``.jsonl`` or ``.csv`` manifest into rows (paths as written, not resolved).

    Raises:
        ValueError: bad JSON, a missing ``path``/column, or a name both present and unknown;
            the message names the file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"manifest must end with {' or '.join(MANIFEST_SUFFIXES)}: {path}")
    rows: list[ManifestRow] = []
    with open(path, encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: invalid JSON: {exc}") from exc
                if not isinstance(obj, dict) or not isinstance(obj.get("path"), str):
                    raise ValueError(f"{where}: each line must be an object with a string 'path'")
                rows.append(ManifestRow(obj["path"], _as_names(obj.get("labels"), where, "labels"),
                                        _as_names(obj.get("unknown"), where, "unknown")))
        else:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"path", "labels"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: CSV header must name 'path' and 'labels' columns, got {reader.fieldnames}")
            for lineno, rec in enumerate(reader, start=2):
                if not (rec.get("path") or "").strip():
                    raise ValueError(f"{path}:{lineno}: empty path")
                rows.append(ManifestRow(rec["path"].strip(), _split_names(rec.get("labels")),
                                        _split_names(rec.get("unknown"))))
    for i, row in enumerate(rows):
        both = set(row.labels) & set(row.unknown)
        if both:
            raise ValueError(f"{path}: entry {i} ({row.path}) lists {sorted(both)} as both present and unknown")
    return rows


def write_manifest(path: str | Path, rows: Iterable[ManifestRow]) -> Path:
    """Write rows as a JSONL manifest (``unknown`` only where non-empty); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            obj: dict[str, Any] = {"path": row.path, "labels": list(row.labels)}
            if row.unknown:
                obj["unknown"] = list(row.unknown)
            f.write(json.dumps(obj) + "\n")
    return path


def find_manifest(root: str | Path, split: str) -> Path:
    """``root`` itself when it is a file, else ``root/{split}.jsonl|csv``, else ``root/manifest.jsonl|csv``."""
    root = Path(root)
    if root.is_file():
        return root
    candidates = [root / f"{stem}{suffix}" for stem in (split, "manifest") for suffix in MANIFEST_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no manifest found: looked for {', '.join(str(c) for c in candidates)}")


def build_manifest(
    root: str | Path,
    split: str,
    transform: Callable[..., Any] | None = None,
    categories: Sequence[str] | None = None,
    on_bad_image: str = "error",
    manifest: str | Path | None = None,
) -> MultiLabelDataset:
    """Build a data set from a manifest: ``manifest`` if given, else found by :func:`find_manifest`."""
    check_on_bad_image(on_bad_image)
    manifest_path = Path(manifest) if manifest is not None else find_manifest(root, split)
    rows = read_manifest(manifest_path)
    if categories is None:
        cats = sorted({name for row in rows for name in (*row.labels, *row.unknown)})
    else:
        cats = list(categories)
    index = {name: i for i, name in enumerate(cats)}
    labels = np.zeros((len(rows), len(cats)), dtype=np.int8)
    ignored: set[str] = set()
    for r, row in enumerate(rows):
        for names, value in ((row.unknown, -1), (row.labels, 1)):
            for name in names:
                col = index.get(name)
                if col is None:
                    ignored.add(name)
                else:
                    labels[r, col] = value
    if ignored:
        warnings.warn(f"{manifest_path} names categories not in the category list, ignored: "
                      f"{', '.join(sorted(ignored))}", stacklevel=2)
    base = manifest_path.parent
    paths = [Path(row.path) if Path(row.path).is_absolute() else base / row.path for row in rows]
    return MultiLabelDataset(paths, labels, cats, transform, on_bad_image)
