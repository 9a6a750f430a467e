"""The base dataset, bad-image handling, splits, transforms and the dataset registry."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sarl.model.data import (
    CLIP_MEAN,
    CLIP_STD,
    DATASET_KINDS,
    BadImageError,
    BadImageWarning,
    MultiLabelDataset,
    build_dataset,
    build_transforms,
    collate_skip_bad,
    load_rgb,
    train_val_split,
)


def _write_image(path: Path, size: tuple[int, int] = (20, 10), color: tuple[int, int, int] = (200, 10, 10)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def three_images(tmp_path: Path) -> list[Path]:
    """Two good PNGs around one file of garbage bytes named like a JPEG."""
    good1 = _write_image(tmp_path / "a.png")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\x00\x01garbage, not an image" * 10)
    good2 = _write_image(tmp_path / "c.png", color=(0, 0, 255))
    return [good1, bad, good2]


LABELS = np.array([[1, 0, -1], [0, 1, 0], [1, 1, 0]], dtype=np.int8)


def test_item_is_image_tensor_and_float_target(three_images: list[Path]) -> None:
    ds = MultiLabelDataset(three_images, LABELS, ["x", "y", "z"])
    image, target = ds[0]
    assert image.shape == (3, 10, 20) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target.dtype == torch.float32
    assert target.tolist() == [1.0, 0.0, -1.0]
    assert len(ds) == 3 and ds.num_classes == 3


def test_labels_are_validated(three_images: list[Path]) -> None:
    with pytest.raises(ValueError, match=r"\{1, 0, -1\}"):
        MultiLabelDataset(three_images, LABELS * 2, ["x", "y", "z"])
    with pytest.raises(ValueError, match="rows"):
        MultiLabelDataset(three_images[:2], LABELS, ["x", "y", "z"])
    with pytest.raises(ValueError, match="categories"):
        MultiLabelDataset(three_images, LABELS, ["x", "y"])
    with pytest.raises(ValueError, match="on_bad_image"):
        MultiLabelDataset(three_images, LABELS, ["x", "y", "z"], on_bad_image="ignore")


def test_bad_image_error_names_the_file(three_images: list[Path]) -> None:
    ds = MultiLabelDataset(three_images, LABELS, ["x", "y", "z"], on_bad_image="error")
    with pytest.raises(BadImageError, match="broken.jpg") as info:
        ds[1]
    assert info.value.path == str(three_images[1])


def test_missing_file_is_a_bad_image(tmp_path: Path) -> None:
    ds = MultiLabelDataset([tmp_path / "nowhere.png"], np.zeros((1, 1)), ["x"])
    with pytest.raises(BadImageError, match="nowhere.png"):
        ds[0]


def test_truncated_jpeg_is_a_bad_image(tmp_path: Path) -> None:
    full = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[:400])
    with pytest.raises(BadImageError, match="cut.jpg"):
        load_rgb(cut)


def test_skip_warns_returns_none_and_collate_counts(three_images: list[Path]) -> None:
    ds = MultiLabelDataset(three_images, LABELS, ["x", "y", "z"], on_bad_image="skip")
    with pytest.warns(BadImageWarning, match="broken.jpg"):
        assert ds[1] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        images, targets, skipped = collate_skip_bad([ds[i] for i in range(3)])
    assert images.shape == (2, 3, 10, 20)
    assert targets.tolist() == [[1, 0, -1], [1, 1, 0]]
    assert skipped == 1


def test_collate_skip_bad_through_a_dataloader(three_images: list[Path]) -> None:
    ds = MultiLabelDataset(three_images, LABELS, ["x", "y", "z"], on_bad_image="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        batches = list(DataLoader(ds, batch_size=2, collate_fn=collate_skip_bad))
    assert [b[0].shape[0] for b in batches] == [1, 1]
    assert sum(b[2] for b in batches) == 1


def test_collate_all_skipped_gives_empty_batch() -> None:
    images, targets, skipped = collate_skip_bad([None, None])
    assert images.numel() == 0 and targets.numel() == 0 and skipped == 2


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone photo taken in portrait
    Image.new("RGB", (40, 20), (10, 200, 10)).save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_grayscale_and_rgba_become_rgb(tmp_path: Path) -> None:
    gray = tmp_path / "g.png"
    Image.new("L", (8, 6), 128).save(gray)
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (8, 6), (1, 2, 3, 4)).save(rgba)
    palette = tmp_path / "p.png"
    Image.new("P", (8, 6), 0).save(palette, transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modes = [load_rgb(p).mode for p in (gray, rgba, palette)]
    assert modes == ["RGB"] * 3


def test_with_labels_and_subset(three_images: list[Path]) -> None:
    ds = MultiLabelDataset(three_images, LABELS, ["x", "y", "z"])
    partial = np.full_like(LABELS, -1)
    other = ds.with_labels(partial)
    assert (other.labels == -1).all() and (ds.labels == LABELS).all()
    assert other.image_paths == ds.image_paths
    with pytest.raises(ValueError):
        ds.with_labels(partial[:2])
    sub = ds.subset([2, 0])
    assert sub.image_paths == [str(three_images[2]), str(three_images[0])]
    assert sub.labels.tolist() == [LABELS[2].tolist(), LABELS[0].tolist()]
    assert sub[0][1].tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(IndexError):
        ds.subset([3])


def test_split_is_seeded_disjoint_and_complete() -> None:
    train, val = train_val_split(1000, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(1000))
    again = train_val_split(1000, 0.1, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, train_val_split(1000, 0.1, seed=4)[1])


def test_split_edge_cases() -> None:
    train, val = train_val_split(5, 0.0, seed=0)
    assert len(val) == 0 and len(train) == 5
    assert len(train_val_split(3, 0.01, seed=0)[1]) == 1  # a positive fraction always gives a validation item
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            train_val_split(10, bad, seed=0)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("augment", ["standard", "none"])
def test_transforms_output_shape(train: bool, augment: str) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8))
    out = build_transforms(32, CLIP_MEAN, CLIP_STD, train=train, augment=augment)(img)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_eval_transform_normalises_with_clip_constants() -> None:
    img = Image.new("RGB", (10, 10), (255, 255, 255))
    out = build_transforms(8)(img)
    expected = [(1.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(out[:, 0, 0], torch.tensor(expected), atol=1e-5)


def test_transform_rejects_unknown_augmentation() -> None:
    with pytest.raises(ValueError, match="augment"):
        build_transforms(32, train=True, augment="heavy")


def test_unknown_kind_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        build_dataset("imagenet", "/nowhere", "train", None)
    for kind in ("coco", "voc", "nuswide", "manifest", "synthetic"):
        assert kind in str(info.value) and kind in DATASET_KINDS


def test_dataset_transform_is_applied(three_images: list[Path]) -> None:
    ds = MultiLabelDataset(three_images, LABELS, ["x", "y", "z"], transform=build_transforms(16))
    assert ds[2][0].shape == (3, 16, 16)
