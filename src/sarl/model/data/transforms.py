"""Image transforms for training and evaluation (torchvision v2), normalised like CLIP.

Training: a random resized crop (scale 0.5 to 1, so most of the image and its objects stay
in view: multi-label images have several objects and a tight crop would cut labelled ones
out) and a horizontal flip. ``augment="none"`` trains on plain resized images. Evaluation:
resize to a square ``image_size`` (no centre crop, which could drop objects near the edges).
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
    return v2.Compose([
        *geometry,
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])
