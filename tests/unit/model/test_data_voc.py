"""VOC XML: the parser and loader on real photos (cards_voc) and a generated VOCdevkit tree."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sarl.model.config import from_dict
from sarl.model.data import VOC_CLASSES, build_dataset, build_transforms, parse_voc_xml
from sarl.model.data.build import check_options
from sarl.model.experiment import ExperimentConfig, prepare_data

JOBS = Path(__file__).resolve().parents[3] / "jobs"


def _cards_root() -> Path:
    env = os.environ.get("SARL_CARDS_VOC")
    root = Path(env) if env else Path(__file__).resolve().parents[3].parent / "shared/data/cards_voc"
    if not (root / "train").is_dir():
        pytest.skip(f"cards_voc data set absent ({root})")
    return root


# Read by hand from the XML files: the distinct <name>s of each image (none is difficult).
CARDS_EXPECTED = {
    ("train", "IMG_2385"): {"king"},
    ("train", "cam_image1"): {"queen", "ten"},  # two queens and a ten
    ("train", "IMG_2614"): {"ace", "queen", "king", "ten"},  # five objects, queen twice
    ("test", "IMG_2383"): {"ace"},
}


def test_parse_voc_xml_on_real_files() -> None:
    root = _cards_root()
    filename, objects = parse_voc_xml(root / "train" / "cam_image1.xml")
    assert filename == "cam_image1.jpg"
    assert objects == [("queen", False), ("queen", False), ("ten", False)]
    filename, objects = parse_voc_xml(root / "train" / "IMG_2385.xml")
    assert filename == "IMG_2385.JPG" and objects == [("king", False)]


def test_cards_labels_match_hand_read_annotations() -> None:
    root = _cards_root()
    for split in ("train", "test"):
        ds = build_dataset("voc", root, split, None)
        assert ds.categories == ["ace", "jack", "king", "nine", "queen", "ten"]
        by_stem = {Path(p).stem: i for i, p in enumerate(ds.image_paths)}
        for (where, stem), expected in CARDS_EXPECTED.items():
            if where != split:
                continue
            row = ds.labels[by_stem[stem]]
            assert {ds.categories[c] for c in np.flatnonzero(row == 1)} == expected, stem
            assert not (row == -1).any()
    assert len(build_dataset("voc", root, "train", None)) == 296
    assert len(build_dataset("voc", root, "test", None)) == 67


def test_cards_loads_a_real_jpeg() -> None:
    root = _cards_root()
    ds = build_dataset("voc", root, "train", None)
    i = [Path(p).name for p in ds.image_paths].index("IMG_2385.JPG")
    image, target = ds[i]
    assert image.shape == (3, 504, 378) and image.dtype == torch.float32  # the XML's height x width
    assert target.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.warns(UserWarning, match="ignored: ace, jack, nine, ten"):  # names outside the given list
        sized = build_dataset("voc", root / "train", "train", build_transforms(224), categories=["king", "queen"])
    assert sized.categories == ["king", "queen"]
    assert sized[sized.image_paths.index(ds.image_paths[i])][0].shape == (3, 224, 224)


def _voc_xml(filename: str, objects: list[tuple[str, int]]) -> str:
    body = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
        f"<xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        for n, d in objects
    )
    return f"<annotation><filename>{filename}</filename>{body}</annotation>"


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    """A VOCdevkit/VOC2007 tree: 3 images; 000002 has a difficult-only cat and a dog seen both ways."""
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    annotations = {
        "000001": [("person", 0), ("dog", 0)],
        "000002": [("cat", 1), ("dog", 1), ("dog", 0), ("car", 0)],
        "000003": [("aeroplane", 0)],
    }
    for image_id, objects in annotations.items():
        Image.new("RGB", (16, 12), (50, 60, 70)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(f"{image_id}.jpg", objects))
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000003\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000002\n")
    return tmp_path / "VOCdevkit"


def test_devkit_difficult_only_is_unknown_in_test(devkit: Path) -> None:
    ds = build_dataset("voc", devkit, "test", None)
    assert ds.categories == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    row = ds.labels[0]
    assert row[VOC_CLASSES.index("cat")] == -1  # difficult only
    assert row[VOC_CLASSES.index("dog")] == 1  # one difficult, one not: present
    assert row[VOC_CLASSES.index("car")] == 1
    assert (np.delete(row, [VOC_CLASSES.index(c) for c in ("cat", "dog", "car")]) == 0).all()
    assert ds[0][1][VOC_CLASSES.index("cat")].item() == -1.0


def test_devkit_difficult_only_is_absent_in_training_as_the_peers_read_it(devkit: Path) -> None:
    ds = build_dataset("voc", devkit / "VOC2007", "trainval", None)  # root may also be the VOC2007 folder
    assert [Path(p).name for p in ds.image_paths] == ["000001.jpg", "000003.jpg"]
    assert {VOC_CLASSES[c] for c in np.flatnonzero(ds.labels[0] == 1)} == {"person", "dog"}
    (devkit / "VOC2007" / "ImageSets" / "Main" / "train.txt").write_text("000002\n")
    train = build_dataset("voc", devkit, "train", None)
    assert train.labels[0, VOC_CLASSES.index("cat")] == 0  # DualCoOp / HCP-MLR-PL skip difficult objects
    assert train.labels[0, VOC_CLASSES.index("dog")] == 1  # a non-difficult dog is in the image too
    assert ds[0][0].shape == (3, 12, 16)


@pytest.mark.parametrize("difficult, label", [("unknown", -1), ("absent", 0)])
def test_difficult_only_in_test_follows_the_option(devkit: Path, difficult: str, label: int) -> None:
    """000002's cat is difficult only: unknown (VOC devkit) or absent (DualCoOp, HCP-MLR-PL) in test."""
    ds = build_dataset("voc", devkit, "test", None, difficult=difficult)
    assert ds.labels[0, VOC_CLASSES.index("cat")] == label
    assert ds.labels[0, VOC_CLASSES.index("dog")] == 1  # a non-difficult dog too: present either way
    assert ds.difficult == difficult  # recorded for the tables, and kept by the copies the experiment makes
    assert ds.with_labels(ds.labels).difficult == ds.subset([0]).difficult == ds.with_transform(None).difficult


@pytest.mark.parametrize("difficult", ["unknown", "absent"])
def test_difficult_only_in_training_is_absent_under_either_option(devkit: Path, difficult: str) -> None:
    (devkit / "VOC2007" / "ImageSets" / "Main" / "train.txt").write_text("000002\n")
    train = build_dataset("voc", devkit, "train", None, difficult=difficult)
    assert train.labels[0, VOC_CLASSES.index("cat")] == 0 and train.labels[0, VOC_CLASSES.index("dog")] == 1
    assert train.difficult == "absent"


def test_difficult_default_is_the_devkits_unknown(devkit: Path) -> None:
    assert build_dataset("voc", devkit, "test", None).difficult == "unknown"


@pytest.mark.parametrize("value", ["present", "auto", "Absent"])
def test_bad_difficult_value_names_the_option_and_the_choices(devkit: Path, value: str) -> None:
    message = rf"data\.options\.difficult: '{value}' is not one of unknown, absent"
    with pytest.raises(ValueError, match=message):
        build_dataset("voc", devkit, "test", None, difficult=value)
    with pytest.raises(ValueError, match=message):  # when a job is loaded, before any worker starts
        check_options("voc", {"difficult": value})


@pytest.mark.parametrize("job", ["voc2007_rn101.yaml", "voc2007_dualcoop_rn101.yaml"])
def test_voc_jobs_score_difficult_objects_as_the_peers(devkit: Path, job: str) -> None:
    """The job's data.options reach the VOC data sets through prepare_data: test labels absent, as the peers'."""
    spec = yaml.safe_load((JOBS / job).read_text())
    assert spec["data"]["options"]["difficult"] == "absent"
    data = {**spec["data"], "root": str(devkit), "val_fraction": 0.0, "num_workers": 0}
    splits = prepare_data(from_dict(ExperimentConfig, {"model": spec["model"], "data": data}))
    assert splits.test.labels[0, VOC_CLASSES.index("cat")] == 0
    assert splits.test.difficult == "absent" and splits.train.difficult == "absent"


def test_devkit_unknown_split_lists_available(devkit: Path) -> None:
    with pytest.raises(FileNotFoundError, match="trainval"):
        build_dataset("voc", devkit, "val", None)


def test_folder_layout_finds_images_by_stem_and_warns_on_unlisted_names(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.PNG")
    (folder / "a.xml").write_text(_voc_xml("renamed_elsewhere.jpg", [("b", 0), ("a", 0)]))
    Image.new("RGB", (8, 8)).save(folder / "b.jpg")
    (folder / "b.xml").write_text(_voc_xml("b.jpg", [("c", 1)]))
    ds = build_dataset("voc", tmp_path, "train", None)
    assert ds.categories == ["a", "b", "c"]
    assert [Path(p).name for p in ds.image_paths] == ["a.PNG", "b.jpg"]
    assert ds.labels.tolist() == [[1, 1, 0], [0, 0, 0]]  # difficult-only in a training split: absent
    with pytest.warns(UserWarning, match="c"):
        only_ab = build_dataset("voc", folder, "train", None, categories=["a", "b"])
    assert only_ab.labels.tolist() == [[1, 1], [0, 0]]


def test_folder_layout_xml_without_image(tmp_path: Path) -> None:
    (tmp_path / "lonely.xml").write_text(_voc_xml("lonely.jpg", [("a", 0)]))
    with pytest.raises(FileNotFoundError, match="lonely.xml"):
        build_dataset("voc", tmp_path, "train", None)
    with pytest.warns(UserWarning, match="lonely.xml"):
        assert len(build_dataset("voc", tmp_path, "train", None, on_bad_image="skip")) == 0


def test_no_voc_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="VOC2007"):
        build_dataset("voc", tmp_path, "train", None)


def test_malformed_xml_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match="bad.xml"):
        parse_voc_xml(tmp_path / "bad.xml")
