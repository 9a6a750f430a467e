"""NUS-WIDE as multi-label data: an image list, a label matrix and a concept list.

Files (each may be given explicitly; defaults under ``root``):

* ``image_list``: one image path per line, relative to ``image_dir`` (default
  ``root/{split}_images.txt``, else NUS-WIDE's own ``root/ImageList/{Split}Imagelist.txt``).
  Windows separators (``actor\\0001_2124494179.jpg``, as in NUS-WIDE's lists) are accepted.
* ``label_file``: whitespace-separated rows of 0/1 (or -1 for unknown), one per image, one
  column per concept (default ``root/{split}_labels.txt``).
* ``concepts_file``: one concept name per line (default ``root/Concepts81.txt``, else
  ``root/concepts.txt``).
* ``image_dir``: the folder the listed paths are relative to (default ``root/images``, else ``root``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import MultiLabelDataset, check_labels, check_on_bad_image


def _first_existing(*candidates: Path) -> Path:
    """The first candidate that exists, else the first one (so the error names the main default)."""
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"NUS-WIDE {what} not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_nuswide(
    root: str | Path,
    split: str,
    transform: Callable[..., Any] | None = None,
    categories: Sequence[str] | None = None,
    on_bad_image: str = "error",
    image_list: str | Path | None = None,
    label_file: str | Path | None = None,
    concepts_file: str | Path | None = None,
    image_dir: str | Path | None = None,
) -> MultiLabelDataset:
    """Build a NUS-WIDE data set (files as in the module docstring).

    Args:
        categories: a subset of the concepts, in the column order wanted; default all of them.

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: the label matrix does not match the image and concept counts, or holds
            values outside {1, 0, -1}; or ``categories`` names concepts not in the list.
    """
    check_on_bad_image(on_bad_image)
    root = Path(root)
    list_path = Path(image_list) if image_list is not None else _first_existing(
        root / f"{split}_images.txt", root / "ImageList" / f"{split.capitalize()}Imagelist.txt"
    )
    label_path = Path(label_file) if label_file is not None else root / f"{split}_labels.txt"
    concepts_path = Path(concepts_file) if concepts_file is not None else _first_existing(
        root / "Concepts81.txt", root / "concepts.txt"
    )
    img_dir = Path(image_dir) if image_dir is not None else _first_existing(root / "images", root)

    rel_paths = [line.replace("\\", "/") for line in _read_lines(list_path, "image list")]
    concepts = _read_lines(concepts_path, "concepts file")
    if not label_path.is_file():
        raise FileNotFoundError(f"NUS-WIDE label file not found: {label_path}")
    try:
        matrix = np.loadtxt(label_path, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"cannot read NUS-WIDE label matrix {label_path}: {exc}") from exc
    if matrix.size == 0:
        matrix = matrix.reshape(0, len(concepts))
    try:
        labels = check_labels(matrix, len(rel_paths), len(concepts))
    except ValueError as exc:
        raise ValueError(f"{label_path}: {exc} (image list {list_path}, concepts {concepts_path})") from exc

    if categories is not None:
        cats = list(categories)
        missing = sorted(set(cats) - set(concepts))
        if missing:
            raise ValueError(f"categories not in {concepts_path}: {', '.join(missing)}")
        labels = labels[:, [concepts.index(c) for c in cats]]
    else:
        cats = concepts
    return MultiLabelDataset([img_dir / p for p in rel_paths], labels, cats, transform, on_bad_image)
