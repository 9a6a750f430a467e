"""Calibrated thresholds against F1 computed by brute force here, and completion that never changes an annotated
entry, fills unknown ones outside the unsure band, and suggests the entries nearest their threshold."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sarl.model.data.manifest import ManifestRow, read_manifest, write_manifest
from sarl.platform.complete import (
    CompleteError,
    best_f1_threshold,
    calibrate_thresholds,
    complete_entries,
    f1_at,
    run_complete,
)


def brute_force_f1(scores: np.ndarray, targets: np.ndarray, threshold: float) -> float:
    known = targets >= 0
    predicted = (scores >= threshold) & known
    positive = (targets == 1)
    tp = int((predicted & positive).sum())
    fp = int((predicted & ~positive).sum())
    fn = int((~predicted & positive).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_the_threshold_maximises_f1_over_the_known_entries(seed: int) -> None:
    rng = np.random.default_rng(seed)
    targets = rng.choice([1, 0, -1], size=40, p=[0.3, 0.5, 0.2])
    scores = np.round(np.clip(0.35 * (targets == 1) + rng.normal(0.4, 0.2, 40), 0, 1), 2)  # ties happen
    threshold, f1 = best_f1_threshold(scores, targets)
    candidates = sorted(set(scores[targets >= 0].tolist()))
    best = max(brute_force_f1(scores, targets, t) for t in candidates)
    assert f1 == pytest.approx(best) and brute_force_f1(scores, targets, threshold) == pytest.approx(best)
    assert threshold in candidates  # a score of a known entry


def test_a_small_case_by_hand() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.4, 0.3, 0.99])
    targets = np.array([1, 0, 1, 1, 0, -1])  # the 0.99 entry is unknown: it counts for nothing
    # t=0.9: tp 1 fp 0 fn 2 -> 0.5; t=0.8: tp 2 fp 1 fn 1 -> 0.667; t=0.4: tp 3 fp 1 fn 0 -> 0.857; t=0.3: 0.75
    assert best_f1_threshold(scores, targets) == (pytest.approx(0.4), pytest.approx(6 / 7))


def test_too_few_known_positives_keep_the_global_threshold() -> None:
    probs = np.array([[0.9, 0.2], [0.8, 0.7], [0.1, 0.3], [0.7, 0.1]])
    targets = np.array([[1, 1], [1, 0], [0, -1], [1, 0]])
    calibration = calibrate_thresholds(probs, targets, min_positives=2, default=0.5)
    assert calibration.positives == [3, 1]
    assert calibration.calibrated == [True, False] and calibration.thresholds == [0.7, 0.5]
    at_half, calibrated = f1_at(probs, targets, 0.5), f1_at(probs, targets, np.array(calibration.thresholds))
    assert calibrated["OF1"] >= at_half["OF1"]


def test_completion_keeps_annotated_entries_and_fills_only_confident_unknown_ones() -> None:
    thresholds = {"cat": 0.5, "dog": 0.5, "car": 0.3, "sofa": 0.6}
    scores = {"cat": 0.1, "dog": 0.9, "car": 0.35, "sofa": 0.95}
    entries = complete_entries(annotated=["cat"], unknown=["dog", "car", "sofa"], scores=scores,
                               thresholds=thresholds, band=0.15)
    assert entries["cat"] == {"state": 1, "source": "annotated", "score": 0.1}  # the model disagrees: kept
    assert entries["dog"]["state"] == 1 and entries["dog"]["source"] == "predicted"
    assert entries["car"] == {"state": -1, "source": "unsure", "score": 0.35}  # within 0.3 +- 0.15
    assert entries["sofa"]["state"] == 1
    absent = complete_entries([], ["cat"], {"cat": 0.3}, {"cat": 0.5}, band=0.15)
    assert absent["cat"] == {"state": 0, "source": "predicted", "score": 0.3}


def test_run_complete_entry_by_entry_and_the_suggestions(tmp_path: Path) -> None:
    rows = [ManifestRow("a.png", ["cat"], ["dog", "car"]), ManifestRow("b.png", [], ["cat"]),
            ManifestRow("c.png", ["dog", "zebra"], ["unicorn"]), ManifestRow("gone.png", [], ["cat"])]
    manifest = write_manifest(tmp_path / "data" / "train.jsonl", rows)
    root = manifest.parent.resolve()
    predictions = [{"path": str(root / "a.png"), "scores": {"cat": 0.2, "dog": 0.52, "car": 0.05}},
                   {"path": str(root / "b.png"), "scores": {"cat": 0.97, "dog": 0.4, "car": 0.6}},
                   {"path": str(root / "c.png"), "scores": {"cat": 0.4, "dog": 0.1, "car": 0.2}}]
    thresholds = {"cat": 0.5, "dog": 0.5, "car": 0.5}
    counts = run_complete(str(manifest), predictions, thresholds, str(tmp_path / "done.jsonl"), band=0.15,
                          suggest=2)
    done = [json.loads(line) for line in (tmp_path / "done.jsonl").read_text().splitlines()]
    for before, after in zip(rows, done):  # every annotated entry, one by one
        for name in thresholds:
            if name not in before.unknown:
                assert after["entries"][name]["source"] == "annotated"
                assert after["entries"][name]["state"] == (1 if name in before.labels else 0)
        for name in before.labels:
            assert name in after["labels"]  # zebra (outside the vocabulary) included
    assert done[0]["entries"]["dog"]["source"] == "unsure" and done[0]["entries"]["car"]["state"] == 0
    assert done[1]["labels"] == ["cat"] and done[1]["entries"]["cat"]["source"] == "predicted"
    assert done[2]["unknown"] == ["unicorn"]  # not served: stays unknown
    assert done[3]["entries"]["cat"]["source"] == "unsure"  # unreadable image: nothing filled
    assert counts["predicted_present"] == 1 and counts["predicted_absent"] == 1 and counts["unscored"] == 1
    # the completed file is a manifest training reads
    assert [r.labels for r in read_manifest(tmp_path / "done.jsonl")][:2] == [["cat"], ["cat"]]
    with open(counts["suggest_file"]) as fh:
        suggested = list(csv.DictReader(fh))
    assert [(s["path"], s["category"]) for s in suggested] == [("a.png", "dog")]  # the only scored unsure entry


@pytest.mark.parametrize("suggest_by, expected", [
    # the three cat entries sit nearest the threshold: margin asks only about cat
    ("margin", [("a.png", "cat"), ("b.png", "cat"), ("c.png", "cat")]),
    # round 0: each category's nearest (cat 0.01, dog 0.05), nearest first; round 1: cat's second (dog has none)
    ("balanced", [("a.png", "cat"), ("a.png", "dog"), ("b.png", "cat")]),
])
def test_suggestions_by_margin_or_balanced_over_categories(tmp_path: Path, suggest_by: str,
                                                           expected: list[tuple[str, str]]) -> None:
    rows = [ManifestRow(f"{n}.png", [], ["cat", "dog"]) for n in "abc"]
    manifest = write_manifest(tmp_path / "train.jsonl", rows)
    root = manifest.parent.resolve()
    scores = {"a": {"cat": 0.51, "dog": 0.45}, "b": {"cat": 0.48, "dog": 0.9}, "c": {"cat": 0.53, "dog": 0.1}}
    predictions = [{"path": str(root / f"{n}.png"), "scores": scores[n]} for n in "abc"]
    counts = run_complete(str(manifest), predictions, {"cat": 0.5, "dog": 0.5}, str(tmp_path / "done.jsonl"),
                          band=0.2, suggest=3, suggest_by=suggest_by)
    with open(counts["suggest_file"]) as fh:
        assert [(s["path"], s["category"]) for s in csv.DictReader(fh)] == expected


def test_an_unknown_suggestion_rule_is_refused(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "train.jsonl", [ManifestRow("a.png", [], ["cat"])])
    with pytest.raises(CompleteError, match="suggest_by must be margin or balanced, not 'entropy'"):
        run_complete(str(manifest), [{"path": str(tmp_path.resolve() / "a.png"), "scores": {"cat": 0.5}}],
                     {"cat": 0.5}, str(tmp_path / "done.jsonl"), suggest=1, suggest_by="entropy")


def test_out_of_fold_keeps_a_threshold_only_when_it_holds_on_the_other_half() -> None:
    # category 0: positives score high everywhere, a threshold above 0.5 holds on both halves;
    # category 1: positives and negatives interleave above 0.5, so a threshold fitted to one half loses on the other
    probs = np.array([[0.95, 0.9], [0.9, 0.8], [0.85, 0.85], [0.6, 0.75], [0.55, 0.7], [0.52, 0.65],
                      [0.2, 0.6], [0.1, 0.55], [0.8, 0.95], [0.58, 0.58]])
    targets = np.array([[1, 1], [1, 0], [1, 1], [0, 0], [0, 1], [0, 0], [0, 1], [0, 0], [1, 0], [0, 1]])
    plain = calibrate_thresholds(probs, targets, min_positives=3)
    guarded = calibrate_thresholds(probs, targets, min_positives=3, out_of_fold=True)
    assert plain.calibrated == [True, True]
    assert guarded.calibrated[0] is True and guarded.thresholds[0] == plain.thresholds[0]
    assert guarded.calibrated[1] is False and guarded.reasons[1] == "no gain out of fold"
    assert guarded.thresholds[1] == 0.5
