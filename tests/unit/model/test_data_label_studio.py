"""data.kind label_studio: a Label Studio JSON export (as its "Export > JSON" writes it) as a data set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sarl.model.data import build_dataset


def _annotation(choices, control, when="2026-01-01T00:00:00Z", cancelled=False):
    return {"id": 1, "completed_by": 1, "was_cancelled": cancelled, "updated_at": when,
            "result": [{"from_name": control, "to_name": "image", "type": "choices", "value": {"choices": choices}}]}


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "docroot"
    (root / "photos").mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "photos" / f"{name}.png")
    return root


def test_an_export_of_both_question_shapes_becomes_labels(images, tmp_path):
    ref = "/data/local-files/?d=photos/{}.png".format
    tasks = [
        # one question per (image, category), as sarl annotate push's entries mode asks it
        {"id": 1, "data": {"image": ref("a"), "category": "dog"}, "annotations": [_annotation(["present"], "answer")]},
        {"id": 2, "data": {"image": ref("a"), "category": "cat"}, "annotations": [_annotation(["absent"], "answer")]},
        {"id": 3, "data": {"image": ref("a"), "category": "cow"},
         "annotations": [_annotation(["can't tell"], "answer")]},
        # the categories as a multiple choice: what is not ticked is absent
        {"id": 4, "data": {"image": ref("b")}, "annotations": [_annotation(["cat", "cow"], "categories")]},
        # skipped, and never annotated: unknown everywhere
        {"id": 5, "data": {"image": ref("c")}, "annotations": [_annotation(["dog"], "categories", cancelled=True)]},
        {"id": 6, "data": {"image": ref("d")}, "annotations": []},
    ]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    ds = build_dataset("label_studio", export, "train", image_root=str(images))
    assert ds.categories == ["cat", "cow", "dog"]
    assert [p.rsplit("/", 1)[1] for p in ds.image_paths] == ["a.png", "b.png", "c.png", "d.png"]
    np.testing.assert_array_equal(ds.labels, [[0, -1, 1], [1, 1, 0], [-1, -1, -1], [-1, -1, -1]])
    image, target = ds[1]
    assert image.shape == (3, 8, 8) and target.tolist() == [1.0, 1.0, 0.0]

    # a folder root finds <split>.json, then export.json; a given category list orders the columns
    ds = build_dataset("label_studio", tmp_path, "test", categories=["dog", "cat", "cow", "pig"],
                       image_root=str(images))
    np.testing.assert_array_equal(ds.labels[1], [0, 1, 1, 0])  # pig: the annotator saw the whole list
    np.testing.assert_array_equal(ds.labels[0], [1, 0, -1, -1])


def test_a_later_annotation_wins_and_bad_exports_name_the_task(images, tmp_path):
    path = str(images / "photos" / "a.png")
    tasks = [{"id": 1, "data": {"image": path, "category": "dog"},
              "annotations": [_annotation(["present"], "answer"),
                              {**_annotation(["absent"], "answer", when="2026-03-01T00:00:00Z"), "id": 2}]}]
    export = tmp_path / "e.json"
    export.write_text(json.dumps(tasks))
    ds = build_dataset("label_studio", tmp_path, "train", export=str(export))
    assert ds.labels.tolist() == [[0]]

    with pytest.raises(ValueError, match=r"task 1 answers \['dog'\], not in the categories"):
        build_dataset("label_studio", export, "train", categories=["cat"])
    export.write_text(json.dumps([{"id": 9, "data": {"image": "s3://bucket/a.png"}, "annotations": []}]))
    with pytest.raises(ValueError, match="task 9: image 's3://bucket/a.png' is remote"):
        build_dataset("label_studio", export, "train")
    export.write_text(json.dumps([{"id": 3, "data": {"image": "/data/local-files/?d=x.png"}, "annotations": []}]))
    with pytest.raises(ValueError, match="task 3.*image_root"):
        build_dataset("label_studio", export, "train")
    export.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="list of tasks"):
        build_dataset("label_studio", export, "train")
    with pytest.raises(FileNotFoundError, match="no Label Studio export"):
        build_dataset("label_studio", tmp_path / "nowhere", "train")


def test_the_kind_is_registered_with_its_options():
    from sarl.model.data.build import DATASET_KINDS, check_options, dataset_options

    assert "label_studio" in DATASET_KINDS
    assert dataset_options("label_studio") == ("category_key", "export", "image_key", "image_root")
    with pytest.raises(ValueError, match="not taken by data set kind 'label_studio'"):
        check_options("label_studio", {"manifest": "x"})
