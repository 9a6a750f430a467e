"""COCO, NUS-WIDE and manifest (JSONL, CSV) loaders on tiny generated files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sarl.model.data import build_dataset, read_manifest


def _image(path: Path, size: tuple[int, int] = (12, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 80, 70)).save(path)


# ---------------------------------------------------------------- COCO


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """COCO 2014 layout: ids out of order, a crowd annotation, an image without annotations."""
    data = {
        "images": [
            {"id": 30, "file_name": "COCO_val2014_000000000030.jpg", "width": 12, "height": 8},
            {"id": 10, "file_name": "COCO_val2014_000000000010.jpg", "width": 12, "height": 8},
            {"id": 20, "file_name": "COCO_val2014_000000000020.jpg", "width": 12, "height": 8},
        ],
        "categories": [
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 1, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 18, "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 18, "iscrowd": 0},
            {"id": 4, "image_id": 30, "category_id": 3, "iscrowd": 1},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    for image in data["images"]:
        _image(tmp_path / "val2014" / image["file_name"])
    return tmp_path


def test_coco_labels_in_category_id_order(coco_root: Path) -> None:
    ds = build_dataset("coco", coco_root, "val", None)
    assert ds.categories == ["person", "car", "dog"]  # COCO ids 1, 3, 18
    assert [Path(p).name for p in ds.image_paths] == ["COCO_val2014_000000000010.jpg",
                                                      "COCO_val2014_000000000030.jpg"]
    assert ds.labels.tolist() == [[1, 0, 1], [0, 1, 0]]  # crowd annotations count
    assert ds[0][0].shape == (3, 8, 12)


def test_coco_empty_images_and_explicit_files(coco_root: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere.json"
    moved.write_text((coco_root / "annotations" / "instances_val2014.json").read_text())
    ds = build_dataset("coco", "/not/used", "val", None, annotation_file=moved, image_dir=coco_root / "val2014",
                       include_empty=True, categories=["dog", "person"])
    assert len(ds) == 3 and ds.categories == ["dog", "person"]
    assert ds.labels.tolist() == [[1, 1], [0, 0], [0, 0]]
    assert ds[1][0].shape == (3, 8, 12)
    with pytest.raises(ValueError, match="zebra"):
        build_dataset("coco", coco_root, "val", None, categories=["zebra"])
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        build_dataset("coco", coco_root, "train", None)


# ---------------------------------------------------------------- NUS-WIDE


@pytest.fixture
def nus_root(tmp_path: Path) -> Path:
    (tmp_path / "Concepts81.txt").write_text("animal\nbeach\nclouds\n")
    (tmp_path / "train_images.txt").write_text("actor\\0001.jpg\nbeach/0002.jpg\n\n")  # NUS-WIDE uses backslashes
    (tmp_path / "train_labels.txt").write_text("1 0 1\n0  1 0\n")
    _image(tmp_path / "images" / "actor" / "0001.jpg")
    _image(tmp_path / "images" / "beach" / "0002.jpg")
    return tmp_path


def test_nuswide_defaults(nus_root: Path) -> None:
    ds = build_dataset("nuswide", nus_root, "train", None)
    assert ds.categories == ["animal", "beach", "clouds"]
    assert ds.labels.tolist() == [[1, 0, 1], [0, 1, 0]]
    assert ds.image_paths[0].endswith("images/actor/0001.jpg")
    assert ds[1][0].shape == (3, 8, 12)


def test_nuswide_explicit_files_and_subset_of_concepts(nus_root: Path) -> None:
    (nus_root / "other_labels.txt").write_text("0 1 1\n1 0 0\n")
    ds = build_dataset("nuswide", nus_root, "test", None, image_list=nus_root / "train_images.txt",
                       label_file=nus_root / "other_labels.txt", categories=["clouds", "animal"])
    assert ds.categories == ["clouds", "animal"] and ds.labels.tolist() == [[1, 0], [0, 1]]


def test_nuswide_shape_mismatch_is_an_error(nus_root: Path) -> None:
    (nus_root / "train_labels.txt").write_text("1 0 1\n")
    with pytest.raises(ValueError, match="rows"):
        build_dataset("nuswide", nus_root, "train", None)
    (nus_root / "train_labels.txt").write_text("1 0\n0 1\n")
    with pytest.raises(ValueError, match="columns"):
        build_dataset("nuswide", nus_root, "train", None)
    with pytest.raises(FileNotFoundError, match="test_images.txt"):
        build_dataset("nuswide", nus_root, "test", None)


# ---------------------------------------------------------------- manifests


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    for name in ("a.png", "sub/b.png", "c.png"):
        _image(tmp_path / name)
    return tmp_path


def test_manifest_jsonl(manifest_dir: Path) -> None:
    lines = [
        {"path": "a.png", "labels": ["cat", "dog"]},
        {"path": "sub/b.png", "labels": [], "unknown": ["cat"]},
        {"path": str(manifest_dir / "c.png"), "labels": ["bird"]},  # absolute paths stay as they are
    ]
    (manifest_dir / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = build_dataset("manifest", manifest_dir, "train", None)
    assert ds.categories == ["bird", "cat", "dog"]
    assert ds.labels.tolist() == [[0, 1, 1], [0, -1, 0], [1, 0, 0]]
    assert Path(ds.image_paths[1]) == manifest_dir / "sub" / "b.png"
    assert ds[2][0].shape == (3, 8, 12)
    # the manifest file itself may be the root; given categories fix the columns
    with pytest.warns(UserWarning, match="bird"):
        given = build_dataset("manifest", manifest_dir / "train.jsonl", "whatever", None, categories=["dog", "cat"])
    assert given.labels.tolist() == [[1, 1], [0, -1], [0, 0]]


def test_manifest_csv_with_both_separators(manifest_dir: Path) -> None:
    (manifest_dir / "labels.csv").write_text("path,labels\na.png,cat;dog\nsub/b.png,\nc.png,bird|cat\n")
    ds = build_dataset("manifest", manifest_dir, "test", None, manifest=manifest_dir / "labels.csv")
    assert ds.categories == ["bird", "cat", "dog"]
    assert ds.labels.tolist() == [[0, 1, 1], [0, 0, 0], [1, 1, 0]]
    assert ds[0][0].shape == (3, 8, 12)


def test_manifest_errors_name_the_line(manifest_dir: Path) -> None:
    bad = manifest_dir / "bad.jsonl"
    bad.write_text('{"path": "a.png", "labels": ["x"]}\n{"labels": ["x"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_manifest(bad)
    both = manifest_dir / "both.jsonl"
    both.write_text('{"path": "a.png", "labels": ["x"], "unknown": ["x"]}\n')
    with pytest.raises(ValueError, match="both present and unknown"):
        read_manifest(both)
    header = manifest_dir / "h.csv"
    header.write_text("file,tags\na.png,x\n")
    with pytest.raises(ValueError, match="path"):
        read_manifest(header)
    with pytest.raises(FileNotFoundError, match="val.jsonl"):
        build_dataset("manifest", manifest_dir, "val", None)


def test_manifest_labels_are_int8(manifest_dir: Path) -> None:
    (manifest_dir / "manifest.jsonl").write_text('{"path": "a.png", "labels": ["x"]}\n')
    ds = build_dataset("manifest", manifest_dir, "anything", None)  # falls back to manifest.jsonl
    assert ds.labels.dtype == np.int8
