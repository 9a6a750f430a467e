"""Partial-label masks: the benchmark protocol, reproducibility and the safe file format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sarl.model.data import apply_known_mask, load_mask, make_partial_labels, save_mask


@pytest.fixture(scope="module")
def full_labels() -> np.ndarray:
    """A COCO-sized complete label matrix (2000 images x 80 classes), about 5% positives."""
    return (np.random.default_rng(123).random((2000, 80)) < 0.05).astype(np.int8)


def test_same_seed_same_mask(full_labels: np.ndarray) -> None:
    a = make_partial_labels(full_labels, 0.3, seed=7)
    b = make_partial_labels(full_labels, 0.3, seed=7)
    assert np.array_equal(a, b)


def test_different_seed_different_mask(full_labels: np.ndarray) -> None:
    a = make_partial_labels(full_labels, 0.3, seed=7)
    b = make_partial_labels(full_labels, 0.3, seed=8)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_known_share_matches_proportion(full_labels: np.ndarray, p: float) -> None:
    partial = make_partial_labels(full_labels, p, seed=0)
    known = partial != -1
    assert abs(known.mean() - p) < 0.01
    assert np.array_equal(partial[known], full_labels[known])  # kept entries keep their value
    # positives and negatives are hidden alike
    pos = full_labels == 1
    assert abs(known[pos].mean() - p) < 0.03 and abs(known[~pos].mean() - p) < 0.01


def test_result_is_a_new_int8_array(full_labels: np.ndarray) -> None:
    before = full_labels.copy()
    partial = make_partial_labels(full_labels, 0.5, seed=0)
    assert partial.dtype == np.int8 and partial.shape == full_labels.shape
    assert np.array_equal(full_labels, before)


def test_proportion_one_keeps_everything_and_unknowns_stay(full_labels: np.ndarray) -> None:
    assert np.array_equal(make_partial_labels(full_labels, 1.0, seed=0), full_labels)
    with_unknown = full_labels.copy()
    with_unknown[0, :] = -1
    assert (make_partial_labels(with_unknown, 1.0, seed=0)[0] == -1).all()


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "half"])
def test_bad_proportion_is_an_error(full_labels: np.ndarray, bad: object) -> None:
    with pytest.raises(ValueError, match="proportion"):
        make_partial_labels(full_labels, bad, seed=0)  # type: ignore[arg-type]


def test_bad_labels_are_an_error() -> None:
    with pytest.raises(ValueError):
        make_partial_labels(np.array([[2, 0]]), 0.5, seed=0)


def test_save_load_round_trip(tmp_path: Path, full_labels: np.ndarray) -> None:
    partial = make_partial_labels(full_labels, 0.2, seed=5)
    path = save_mask(tmp_path / "run" / "mask_p0.2_s5.npz", partial, {"proportion": 0.2, "seed": 5, "dataset": "x"})
    assert path == tmp_path / "run" / "mask_p0.2_s5.npz" and path.is_file()
    loaded, meta = load_mask(path)
    assert np.array_equal(loaded, partial) and loaded.dtype == np.int8
    assert meta["proportion"] == 0.2 and meta["seed"] == 5 and meta["dataset"] == "x"
    assert meta["shape"] == [2000, 80] and meta["kind"] == "labels"
    # the file holds no pickled object: numpy refuses object arrays without allow_pickle
    with np.load(path, allow_pickle=False) as npz:
        assert json.loads(str(npz["meta"]))["seed"] == 5


def test_save_load_boolean_known_mask(tmp_path: Path, full_labels: np.ndarray) -> None:
    known = make_partial_labels(full_labels, 0.4, seed=1) != -1
    path = save_mask(tmp_path / "known.npz", known, {"proportion": 0.4, "seed": 1})
    loaded, meta = load_mask(path)
    assert loaded.dtype == np.bool_ and np.array_equal(loaded, known) and meta["kind"] == "known"
    assert np.array_equal(apply_known_mask(full_labels, loaded), make_partial_labels(full_labels, 0.4, seed=1))


def test_load_rejects_foreign_npz(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, something=np.zeros(3))
    with pytest.raises(ValueError, match="save_mask"):
        load_mask(path)
