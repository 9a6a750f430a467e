"""Synthetic shapes: determinism, label counts, subsets, and the round trip through a manifest."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sarl.model.data import SHAPES, SyntheticShapes, build_dataset, build_transforms


def test_same_seed_same_tensors_different_seed_different() -> None:
    a = SyntheticShapes(6, seed=1)
    b = SyntheticShapes(6, seed=1)
    c = SyntheticShapes(6, seed=2)
    assert np.array_equal(a.labels, b.labels)
    for i in range(6):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(6))
    assert not torch.equal(a[0][0], a[1][0])


def test_item_depends_only_on_seed_split_and_index() -> None:
    """Any worker can render item i: a 3-item set and a 50-item set agree on their first 3 items."""
    small, large = SyntheticShapes(3, seed=4), SyntheticShapes(50, seed=4)
    for i in range(3):
        assert torch.equal(small[i][0], large[i][0])
    clone = pickle.loads(pickle.dumps(large))  # what a DataLoader worker receives
    assert torch.equal(clone[7][0], large[7][0])
    test = SyntheticShapes(3, seed=4, split="test")
    assert not torch.equal(test[0][0], small[0][0])


def test_images_and_label_counts() -> None:
    ds = SyntheticShapes(200, image_size=48, num_classes=5, min_objects=2, max_objects=3, seed=0)
    assert ds.categories == list(SHAPES[:5])
    counts = (ds.labels == 1).sum(axis=1)
    assert counts.min() >= 2 and counts.max() <= 3
    assert set(np.unique(ds.labels)) <= {0, 1}
    assert (ds.labels.sum(axis=0) > 0).all()  # every class occurs
    image, target = ds[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert target.shape == (5,)


def test_labels_match_the_rendered_scene() -> None:
    ds = SyntheticShapes(20, seed=3)
    for i in range(20):
        drawn = {SHAPES[o.shape] for o in ds.scene(i).objects}
        assert drawn == {ds.categories[c] for c in np.flatnonzero(ds.labels[i] == 1)}


def test_shapes_are_visible() -> None:
    """Each image shows its shapes: pixels far from the background colour cover a real area."""
    ds = SyntheticShapes(10, image_size=64, seed=0)
    for i in range(10):
        pixels = np.asarray(ds.load_image(i), dtype=np.float32)
        background = np.array(ds.scene(i).background, dtype=np.float32)
        foreground = (np.linalg.norm(pixels - background, axis=-1) > 70).mean()
        assert foreground > 0.04 * len(ds.scene(i).objects)


def test_subset_keeps_pixels_and_labels() -> None:
    ds = SyntheticShapes(10, seed=0)
    sub = ds.subset([7, 2])
    assert torch.equal(sub[0][0], ds[7][0]) and torch.equal(sub[1][1], ds[2][1])
    assert len(sub) == 2 and sub.labels.tolist() == ds.labels[[7, 2]].tolist()


def test_categories_pick_shapes_and_bad_arguments() -> None:
    ds = SyntheticShapes(5, categories=["star", "ring"], max_objects=2)
    assert ds.categories == ["star", "ring"]
    with pytest.raises(ValueError, match="hexagon"):
        SyntheticShapes(5, categories=["hexagon"])
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticShapes(5, num_classes=9)
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticShapes(5, num_classes=2, max_objects=3)


def test_build_dataset_synthetic_splits_differ() -> None:
    tr = build_dataset("synthetic", None, "train", build_transforms(32), num_images=4, seed=0, num_classes=4)
    te = build_dataset("synthetic", None, "test", build_transforms(32), num_images=4, seed=0, num_classes=4)
    assert tr[0][0].shape == (3, 32, 32) and tr.categories == list(SHAPES[:4])
    assert not torch.equal(tr[0][0], te[0][0])


def test_write_to_round_trips_through_manifest(tmp_path: Path) -> None:
    ds = SyntheticShapes(5, image_size=32, num_classes=4, seed=9)
    partial = ds.labels.copy()
    partial[0, 0] = -1
    ds = ds.with_labels(partial)
    manifest = ds.write_to(tmp_path / "shapes")
    assert manifest == tmp_path / "shapes" / "manifest.jsonl"
    assert len(list((tmp_path / "shapes" / "images").glob("*.png"))) == 5
    back = build_dataset("manifest", tmp_path / "shapes", "train", None, categories=ds.categories)
    assert np.array_equal(back.labels, ds.labels)
    assert torch.equal(back[3][0], ds[3][0])  # PNG is lossless


def test_hard_preset_draws_grouped_small_objects_with_distractors_and_clutter():
    from sarl.model.data.synthetic import DISTRACTORS, HARD_GROUPS, HARD_SHAPES, SyntheticShapes

    ds = SyntheticShapes(200, preset="hard", seed=3)
    assert ds.categories == list(HARD_SHAPES) and len(ds.categories) == 16
    assert ds.labels.sum(1).min() >= 1 and ds.labels.sum(1).max() <= 4
    scenes = [ds.scene(i) for i in range(len(ds))]
    assert all(0.2 * 64 - 1e-6 <= o.radius <= 0.28 * 64 + 1e-6 for s in scenes for o in s.objects)
    assert any(s.distractors for s in scenes) and all(s.clutter for s in scenes)
    assert {DISTRACTORS[d.shape] for s in scenes for d in s.distractors} == set(DISTRACTORS)
    # Co-occurrence: most objects of an image with 3 or more share one group.
    group_of = {name: g for g, names in enumerate(HARD_GROUPS) for name in names}
    many = [[group_of[HARD_SHAPES[o.shape]] for o in s.objects] for s in scenes if len(s.objects) >= 3]
    shared = sum(max(g.count(x) for x in g) >= 2 for g in many) / len(many)
    assert shared > 0.8
    again = SyntheticShapes(200, preset="hard", seed=3)
    assert (again.labels == ds.labels).all()
    assert np.array_equal(np.asarray(again.load_image(7)), np.asarray(ds.load_image(7)))


def test_rendered_images_are_kept_and_shared_with_subsets_but_not_pickled():
    import pickle

    from sarl.model.data.synthetic import SyntheticShapes

    ds = SyntheticShapes(20, preset="hard", seed=1)
    first = np.asarray(ds.load_image(5))
    part = ds.subset([5, 6])
    assert np.array_equal(np.asarray(part.load_image(0)), first) and len(ds._rendered) == 1
    part.load_image(1)
    assert len(ds._rendered) == 2  # the subset filled the shared store
    assert np.array_equal(np.asarray(ds.load_image(5)), first)  # the kept pixels are the rendered ones
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._rendered == {} and np.array_equal(np.asarray(copy.load_image(5)), first)


def test_unknown_preset_is_refused():
    from sarl.model.data.synthetic import SyntheticShapes

    with pytest.raises(ValueError, match="unknown synthetic preset 'medium'"):
        SyntheticShapes(4, preset="medium")
