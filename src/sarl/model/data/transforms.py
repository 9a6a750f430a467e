"""Image transforms for training and evaluation (torchvision v2), normalised like CLIP.

Training: a random resized crop (scale 0.5 to 1, so most of the image and its objects stay
in view: multi-label images have several objects and a tight crop would cut labelled ones
out) and a horizontal flip. ``augment="none"`` trains on plain resized images. Evaluation:
resize to a square ``image_size`` (no centre crop, which could drop objects near the edges).

A transform is two parts, usable apart: :func:`build_geometry` (PIL image to uint8 (3, size, size)) and
:func:`build_normalization` (uint8 to normalised float32, on any device, batched or not). ``sarl predict`` runs the
first where images are decoded and the second beside the model, so a quarter of the bytes travel between them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD, copied so this module needs no open_clip import.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

AUGMENTATIONS = ("standard", "none")


def build_transforms(
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    train: bool = False,
    augment: str = "standard",
) -> Callable[[Any], torch.Tensor]:
    """A transform from a PIL image (or image tensor) to a normalised float tensor (3, size, size).

    Args:
        image_size: output height and width.
        mean, std: per-channel normalisation (default CLIP's).
        train: training transforms (augmented unless ``augment="none"``) or evaluation ones.
        augment: ``"standard"`` (random resized crop, scale 0.5-1, plus horizontal flip) or ``"none"``.
    """
    return v2.Compose([build_geometry(image_size, train, augment), build_normalization(mean, std)])


def build_geometry(image_size: int, train: bool = False, augment: str = "standard") -> Callable[[Any], torch.Tensor]:
    """The first part of :func:`build_transforms`: a PIL image (or uint8 image tensor) to uint8 (3, size, size)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}; got {augment!r}")
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    size = int(image_size)
    if train and augment == "standard":
        geometry = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize((size, size), antialias=True)]
    # Geometry first: on PIL input, resizing before ToImage lets PIL shrink large photos cheaply.
    return v2.Compose([*geometry, v2.ToImage()])


def build_normalization(mean: Sequence[float] = CLIP_MEAN,
                        std: Sequence[float] = CLIP_STD) -> Callable[[torch.Tensor], torch.Tensor]:
    """The second part of :func:`build_transforms`: uint8 images (..., 3, H, W), one or a batch, on any device, to
    float32 scaled to [0, 1] and normalised per channel; the same values as the whole transform gives."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])
