"""Data for multi-label recognition with partial labels.

Every kind of data set becomes a :class:`MultiLabelDataset` whose items are
``(image_tensor, target)``, ``target`` a float tensor (C,) of 1 present, 0 absent, -1 unknown.
Build one with :func:`build_dataset`; hide labels with :func:`make_partial_labels` and
``dataset.with_labels``; carve validation with :func:`train_val_split` and ``dataset.subset``.
"""

from .build import DATASET_KINDS, DATASET_WORDS, build_dataset, build_synthetic, category_words
from .coco import build_coco
from .datasets import (
    BadImageError,
    BadImageWarning,
    MultiLabelDataset,
    check_labels,
    collate_skip_bad,
    load_rgb,
)
from .manifest import ManifestRow, build_manifest, read_manifest, write_manifest
from .masks import apply_known_mask, load_mask, make_partial_labels, save_mask
from .nuswide import build_nuswide
from .splits import train_val_split
from .synthetic import SHAPES, SyntheticShapes
from .transforms import CLIP_MEAN, CLIP_STD, build_transforms
from .voc import VOC_CLASSES, VOC_WORDS, build_voc, parse_voc_xml

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASET_KINDS",
    "DATASET_WORDS",
    "SHAPES",
    "VOC_CLASSES",
    "VOC_WORDS",
    "BadImageError",
    "BadImageWarning",
    "ManifestRow",
    "MultiLabelDataset",
    "SyntheticShapes",
    "apply_known_mask",
    "build_coco",
    "build_dataset",
    "build_manifest",
    "build_nuswide",
    "build_synthetic",
    "build_transforms",
    "build_voc",
    "category_words",
    "check_labels",
    "collate_skip_bad",
    "load_mask",
    "load_rgb",
    "make_partial_labels",
    "parse_voc_xml",
    "read_manifest",
    "save_mask",
    "train_val_split",
    "write_manifest",
]
