"""Partial-label masks: the MLR-PL benchmark protocol, drawn from a seed and saved safely.

For a known-label proportion p, each (image, class) entry is kept independently with
probability p, positives and negatives alike; the others become -1 (unknown). The draw comes
from ``np.random.default_rng(seed)`` so every method of a comparison sees the same mask, and
the result is saved next to the run as ``.npz`` (loaded with ``allow_pickle=False``: a mask
file cannot run code) together with its proportion, seed and shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import check_labels


def check_proportion(proportion: float) -> float:
    """Return ``proportion`` as a float if it lies in (0, 1], else raise a ValueError naming it."""
    try:
        value = float(proportion)
    except (TypeError, ValueError):
        raise ValueError(f"proportion must be a number in (0, 1], got {proportion!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"proportion must be in (0, 1], got {proportion!r}")
    return value


def make_partial_labels(labels: np.ndarray, proportion: float, seed: int) -> np.ndarray:
    """Keep each (image, class) entry with probability ``proportion``; the others become -1.

    Args:
        labels: N x C array in {1, 0, -1} (complete labels; entries already -1 stay -1).
        proportion: known-label proportion p in (0, 1]; 1 keeps everything.
        seed: seed of ``np.random.default_rng``; the same (labels shape, p, seed) gives the same mask.

    Returns:
        A new ``np.int8`` array of the same shape.
    """
    p = check_proportion(proportion)
    full = check_labels(labels)
    keep = np.random.default_rng(seed).random(full.shape) < p
    return np.where(keep, full, np.int8(-1)).astype(np.int8)


def save_mask(path: str | Path, mask_or_labels: np.ndarray, meta: Mapping[str, Any] | None = None) -> Path:
    """Save partial labels (values in {1, 0, -1}) or a boolean known-mask to an ``.npz`` file.

    Args:
        path: destination; parent folders are created. The name is used as given.
        mask_or_labels: an N x C array, either labels in {1, 0, -1} or booleans (True = known).
        meta: JSON-serialisable facts to keep with it, typically ``proportion`` and ``seed``
            (and e.g. the data set and categories). ``shape`` and ``kind`` are added.

    Returns:
        The path written.
    """
    arr = np.asarray(mask_or_labels)
    if arr.dtype == np.bool_:
        if arr.ndim != 2:
            raise ValueError(f"a known-mask must be 2-D, got shape {arr.shape}")
        kind = "known"
    else:
        arr = check_labels(arr)
        kind = "labels"
    info = dict(meta or {})
    info.update(shape=list(arr.shape), kind=kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: numpy would otherwise append ".npz" to the name
        np.savez_compressed(f, data=arr, meta=np.array(json.dumps(info, sort_keys=True)))
    return path


def load_mask(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Load what :func:`save_mask` wrote: ``(array, meta)``; no pickled objects are read.

    The array is ``np.int8`` labels in {1, 0, -1} or a boolean known-mask, as saved
    (``meta["kind"]`` says which); ``meta`` holds ``proportion``, ``seed``, ``shape`` and the rest.
    """
    with np.load(Path(path), allow_pickle=False) as npz:
        if "data" not in npz or "meta" not in npz:
            raise ValueError(f"{path} is not a mask file written by save_mask")
        arr = npz["data"]
        meta = json.loads(str(npz["meta"]))
    if list(arr.shape) != list(meta.get("shape", arr.shape)):
        raise ValueError(f"{path}: stored shape {meta.get('shape')} does not match the array {arr.shape}")
    if meta.get("kind") == "labels":
        arr = check_labels(arr)
    return arr, meta


def apply_known_mask(labels: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Partial labels from complete ``labels`` and a boolean ``known`` mask of the same shape."""
    full = check_labels(labels)
    known = np.asarray(known, dtype=bool)
    if known.shape != full.shape:
        raise ValueError(f"mask shape {known.shape} does not match labels {full.shape}")
    return np.where(known, full, np.int8(-1)).astype(np.int8)
