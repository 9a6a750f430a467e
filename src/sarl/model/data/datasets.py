"""The base multi-label dataset: images plus a {1, 0, -1} label matrix.

Every data set kind (COCO, VOC, NUS-WIDE, manifests, synthetic shapes) ends up as a
:class:`MultiLabelDataset`, so the engine, the partial-label masks and the metrics see one
shape of data: ``dataset[i] -> (image_tensor, target)`` with ``target`` a float tensor of
shape ``(C,)`` holding 1 (present), 0 (absent) or -1 (unknown).

Unreadable images are common in user data (truncated downloads, HTML saved as ``.jpg``).
``on_bad_image="error"`` stops with an error naming the file; ``"skip"`` warns, returns
``None`` for that item and lets :func:`collate_skip_bad` drop it from the batch and count it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

BAD_IMAGE_POLICIES = ("error", "skip")

Item = tuple[torch.Tensor, torch.Tensor]


class BadImageError(OSError):
    """An image file that cannot be opened or decoded; ``path`` names it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = str(path)


class BadImageWarning(UserWarning):
    """Warned when ``on_bad_image="skip"`` drops an unreadable image (the message names the file)."""


def check_on_bad_image(on_bad_image: str) -> str:
    """Return ``on_bad_image`` if it is a known policy, else raise a ValueError listing them."""
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}; got {on_bad_image!r}")
    return on_bad_image


def check_labels(labels: np.ndarray, num_items: int | None = None, num_classes: int | None = None) -> np.ndarray:
    """Validate a label matrix (N x C, values in {1, 0, -1}) and return it as ``np.int8``.

    Raises:
        ValueError: wrong rank, wrong shape, or a value outside {1, 0, -1}.
    """
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"labels must be a 2-D array (images x classes), got shape {arr.shape}")
    if num_items is not None and arr.shape[0] != num_items:
        raise ValueError(f"labels have {arr.shape[0]} rows but there are {num_items} images")
    if num_classes is not None and arr.shape[1] != num_classes:
        raise ValueError(f"labels have {arr.shape[1]} columns but there are {num_classes} categories")
    bad = ~np.isin(arr, (-1, 0, 1))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"labels must be in {{1, 0, -1}}; found {arr[row, col]!r} at row {row}, column {col}")
    return arr.astype(np.int8, copy=True)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as an upright RGB PIL image (EXIF orientation applied).

    Phone photos store their rotation in EXIF; without ``exif_transpose`` a portrait photo is
    seen sideways. Decoding is forced here (``load``) so truncated files fail now, not later
    inside a transform.

    Raises:
        BadImageError: the file is missing, not an image, or truncated; the message names it.
    """
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(path, f"{type(exc).__name__}: {exc}") from exc


def default_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert a PIL image to a float tensor (3, H, W) in [0, 1]; used when no transform is given."""
    return TF.to_dtype(TF.to_image(img), torch.float32, scale=True)


class MultiLabelDataset(Dataset):
    """Images with multi-label targets in {1, 0, -1}.

    Args:
        image_paths: one path per image (for generated data, a name used in messages).
        labels: N x C array, 1 present, 0 absent, -1 unknown; stored as ``np.int8``.
        categories: the C category names, in label column order.
        transform: applied to the RGB PIL image; ``None`` gives a float tensor in [0, 1].
        on_bad_image: ``"error"`` raises :class:`BadImageError` naming the file; ``"skip"``
            warns (:class:`BadImageWarning`) and returns ``None`` for the item, to be dropped
            by :func:`collate_skip_bad`.

    Subclasses that produce images without files override :meth:`load_image`.
    """

    def __init__(
        self,
        image_paths: Sequence[str | Path],
        labels: np.ndarray,
        categories: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
        on_bad_image: str = "error",
    ) -> None:
        self.image_paths = [str(p) for p in image_paths]
        self.categories = [str(c) for c in categories]
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"category names must be unique, got {self.categories}")
        self.labels = check_labels(labels, len(self.image_paths), len(self.categories))
        self.transform = transform
        self.on_bad_image = check_on_bad_image(on_bad_image)

    @property
    def num_classes(self) -> int:
        """Number of categories C."""
        return len(self.categories)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_images={len(self)}, num_classes={self.num_classes})"

    def load_image(self, index: int) -> Image.Image:
        """Return image ``index`` as an upright RGB PIL image; raises :class:`BadImageError`."""
        return load_rgb(self.image_paths[index])

    def target(self, index: int) -> torch.Tensor:
        """The float target (C,) of item ``index``: 1 present, 0 absent, -1 unknown."""
        return torch.from_numpy(self.labels[index].astype(np.float32))

    def __getitem__(self, index: int) -> Item | None:
        try:
            img = self.load_image(index)
        except BadImageError as exc:
            if self.on_bad_image == "error":
                raise
            warnings.warn(f"skipping unreadable image {exc.path}: {exc}", BadImageWarning, stacklevel=2)
            return None
        image = self.transform(img) if self.transform is not None else default_to_tensor(img)
        return image, self.target(index)

    def with_labels(self, labels: np.ndarray) -> MultiLabelDataset:
        """A copy of this dataset with its label matrix replaced (same shape), e.g. a partial-label mask.

        The images, categories and transform are shared; the original is left unchanged.
        """
        new = copy.copy(self)
        new.labels = check_labels(labels, len(self), self.num_classes)
        return new

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> MultiLabelDataset:
        """A copy of this dataset with another transform (e.g. eval transforms for a validation subset)."""
        new = copy.copy(self)
        new.transform = transform
        return new

    def subset(self, indices: Sequence[int] | np.ndarray) -> MultiLabelDataset:
        """A copy holding only the items at ``indices`` (in that order), labels included."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset indices out of range for a dataset of {len(self)} items")
        new = copy.copy(self)
        new.image_paths = [self.image_paths[i] for i in idx]
        new.labels = self.labels[idx].copy()
        return new


def collate_skip_bad(batch: Sequence[Item | None]) -> tuple[Any, torch.Tensor, int]:
    """Collate ``(image, target)`` items, dropping the ``None`` that skipped bad images leave.

    Items of cached features, ``((dense, global), target)``, collate to a ``(dense, global)`` pair of batches.

    Returns ``(images, targets, num_skipped)``. The training engine sums ``num_skipped`` over
    the epoch and reports the count at the end, so a data set with a few broken files trains
    on but says how many it skipped. When every item of a batch was skipped, ``images`` and
    ``targets`` are empty tensors (first dimension 0) and the caller should skip the step.
    """
    kept = [item for item in batch if item is not None]
    num_skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0), num_skipped
    if isinstance(kept[0][0], (tuple, list)):  # cached (dense, global) features: stack each part
        images = tuple(torch.stack(parts) for parts in zip(*(item[0] for item in kept)))
    else:
        images = torch.stack([item[0] for item in kept])
    targets = torch.stack([item[1] for item in kept])
    return images, targets, num_skipped
