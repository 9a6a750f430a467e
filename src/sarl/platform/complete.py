"""Closing the gaps in partial labels: calibrated thresholds (``sarl calibrate``), completion of the unknown
entries of a manifest (``sarl complete``), and what to annotate next (``sarl complete --suggest N``).

**Thresholds.** For each category, the threshold that maximises F1 over the validation split's *known* entries
(the split is partially labelled, like training), among the scores of those entries. A category with fewer than
``min_positives`` known positives keeps the global threshold (its F1 curve is a few points). Measured on the
synthetic set: a model trained on 10% known labels goes from CF1 53.6 to 61.7 on test (the best thresholds
picked on test itself give 63.6); a strong model whose probabilities are already calibrated at 0.5 (the demo's,
CF1 97.3) loses about 1 point, its thresholds fitted to a few validation positives. ``out_of_fold`` (``sarl
calibrate --out-of-fold``) keeps a threshold only if one picked on half of the known entries does not lose to
0.5 on the other half: it protects such a model (no loss) but, on that few entries, also rejects most good
thresholds (10% known: 55.9 instead of 61.7). The thresholds are pushed as a new vocabulary version, so
Serve, ``sarl predict`` and ``sarl complete`` use them; ``sarl calibrate`` reports CF1 / OF1 on the test split
at 0.5 and at the new thresholds: check them before releasing a staged version (``--no-current``).

**Completion.** Only unknown entries change. An unknown entry becomes present when its score is at least
``threshold + band``, absent when at most ``threshold - band``, and stays unknown in between: the band (default
0.15) is where the model is unsure. Annotated entries (present, or absent: a manifest's category not listed as
present or unknown) are copied unchanged. Each output line keeps ``labels`` / ``unknown`` (so it is a manifest
training reads) and adds ``entries``: ``{category: {"state": 1 | 0 | -1, "source": "annotated" | "predicted" |
"unsure", "score": p}}``.

**What to annotate next.** The N unknown entries whose scores lie closest to their category's threshold
(smallest ``|p - threshold|``, uncertainty sampling by margin): the model's decision there is the least
settled, so a label there is most likely to change a prediction and, once trained on, the boundary. The file
is a CSV an annotation tool can load: ``path, category, score, threshold``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from ..model.config import section
from . import node_cache, storage
from .predict import ADDRESS_HELP

DEFAULT_BAND = 0.15
DEFAULT_MIN_POSITIVES = 5


class CompleteError(ValueError):
    """A user error of ``sarl complete``: predictions that do not belong to the manifest."""


@section
class CalibrateConfig:
    """The options of ``sarl calibrate``: its flags, and the keys of its ``--config`` file (``jobs/calibrate.yaml``)."""

    checkpoint: str = Field(description="checkpoint directory or s3:// URI")
    vocab_store: str = Field(description="store to push the calibrated version to")
    version: str | None = Field(None, description="the new version's name (default: <current>-calibrated)")
    min_positives: int = Field(DEFAULT_MIN_POSITIVES, ge=0, description="known positives on val below which a "
                                                                        "category keeps the global threshold")
    no_current: bool = Field(False, description="push without moving the current pointer")
    out_of_fold: bool = Field(False, description="keep a threshold only if one picked on half of val does not lose "
                                                 "on the other half")
    data: list[str] = Field(default_factory=list, description="job overrides for the data, e.g. "
                                                              "data.root=/data/voc")
    workers: int = Field(1, gt=0, description="score the splits as N Ray tasks (as sarl evaluate does)")
    address: str | None = Field(None, description="Ray cluster to score on (default: $RAY_ADDRESS; with neither, "
                                                  "--workers 1 scores in this process)")


@section
class CompleteConfig:
    """The options of ``sarl complete``: its flags, and the keys of its ``--config`` file (``jobs/complete.yaml``)."""

    checkpoint: str = Field(description="checkpoint directory, s3:// URI, or alias file")
    manifest: str = Field(description=".jsonl/.csv manifest with 'unknown' lists")
    output: str = Field(description="the completed manifest (.jsonl)")
    vocab_store: str | None = Field(None, description="thresholds and names from this store's version")
    vocab_version: str | None = Field(None, description="that version (default: current)")
    band: float = Field(DEFAULT_BAND, ge=0, lt=0.5, description="unsure within threshold +- band: stays unknown")
    suggest: int = Field(0, ge=0, description="write the N most uncertain entries")
    suggest_by: Literal["margin", "balanced"] = Field(
        "margin", description="margin: the N nearest their thresholds; balanced: the same rule within each category, "
                              "round-robin over the categories (docs/results/annotation-budget)")
    predictions: str | None = Field(None, description="where the predictions go (default: <output>.predictions/)")
    address: str | None = Field(None, description=ADDRESS_HELP)


# ------------------------------------------------------------------------------------------------ suggestions
@dataclass(frozen=True)
class Scored:
    """One (image, category) decision of the model: ``path`` is the image's URI as ``sarl predict`` keys it."""

    path: str
    category: str
    score: float
    threshold: float

    @property
    def margin(self) -> float:
        return abs(self.score - self.threshold)


def margin_order(entries: list[Scored]) -> list[Scored]:
    """Uncertainty sampling: the entries nearest their threshold first (ties by path, then category)."""
    return sorted(entries, key=lambda e: (e.margin, e.path, e.category))


def write_suggestions(uri: str, entries: list[Scored]) -> str:
    """``entries`` as the ``path, category, score, threshold`` CSV that ``sarl annotate push --suggestions`` reads,
    at ``uri`` (a local path or ``s3://``); returns ``uri``."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path", "category", "score", "threshold"])
    writer.writerows([e.path, e.category, f"{e.score:.6f}", f"{e.threshold:.6f}"] for e in entries)
    storage.write_text(uri, text.getvalue())
    return uri


def balanced_order(entries: list[Scored], categories: list[str]) -> list[Scored]:
    """Uncertainty sampling balanced over categories: each category's entries by margin, taken round-robin (the
    r-th nearest of every category before any (r+1)-th, each round nearest first, ties in ``categories``' order),
    so that N suggestions ask about N/C entries of each category rather than crowd into the few whose scores sit at
    their thresholds (plain margin asked 13-15% of its questions about one of 16 categories in
    docs/results/annotation-budget, where balancing did better)."""
    by_category = {c: sorted((e for e in entries if e.category == c), key=lambda e: (e.margin, e.path))
                   for c in categories}
    rounds = max((len(v) for v in by_category.values()), default=0)
    return [e for r in range(rounds)
            for e in sorted((v[r] for v in by_category.values() if r < len(v)), key=lambda e: e.margin)]


# ------------------------------------------------------------------------------------------------ thresholds
def best_f1_threshold(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """``(threshold, F1)`` maximising F1 of ``scores >= threshold`` over known entries (targets 1 / 0; -1 unknown).

    The candidates are the known entries' scores; ties in F1 go to the higher threshold (fewer positives).
    """
    known = targets >= 0
    s, t = scores[known], targets[known] == 1
    positives = int(t.sum())
    if positives == 0:
        return 1.0, 0.0
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    tp = np.cumsum(t)
    predicted = np.arange(1, len(s) + 1)
    # a cut between equal scores is not a threshold: keep the last index of each run of equal scores
    last = np.r_[s[1:] != s[:-1], True]
    f1 = np.where(last, 2 * tp / (predicted + positives), -1.0)
    best = int(np.flatnonzero(f1 == f1.max())[0])
    return float(s[best]), float(f1[best])


def f1_of(scores: np.ndarray, targets: np.ndarray, threshold: float) -> float:
    """F1 of ``scores >= threshold`` over the known entries."""
    known = targets >= 0
    predicted, positive = scores[known] >= threshold, targets[known] == 1
    tp = int((predicted & positive).sum())
    return 2 * tp / (int(predicted.sum()) + int(positive.sum())) if tp else 0.0


def out_of_fold_gain(scores: np.ndarray, targets: np.ndarray, default: float) -> float:
    """F1 gained over ``default`` by a threshold picked on one half of the known entries and judged on the other
    (both ways, summed): negative when picking a threshold on this few entries overfits."""
    known = np.flatnonzero(targets >= 0)
    halves = known[0::2], known[1::2]
    gain = 0.0
    for pick, judge in (halves, halves[::-1]):
        threshold, _ = best_f1_threshold(scores[pick], targets[pick])
        gain += f1_of(scores[judge], targets[judge], threshold) - f1_of(scores[judge], targets[judge], default)
    return gain


@dataclass
class Calibration:
    thresholds: list[float]  # per trained category
    calibrated: list[bool]  # False: the global threshold kept (too few known positives, or no out-of-fold gain)
    positives: list[int]  # known positives per category on the validation split
    reasons: list[str]


def calibrate_thresholds(probs: np.ndarray, targets: np.ndarray, min_positives: int = DEFAULT_MIN_POSITIVES,
                         default: float = 0.5, out_of_fold: bool = False) -> Calibration:
    """Each category's F1-best threshold on the known entries, kept with at least ``min_positives`` known
    positives (and with ``out_of_fold``, only when a threshold picked on half of the entries does not lose to
    ``default`` on the other half)."""
    out = Calibration([], [], [], [])
    for c in range(probs.shape[1]):
        positives = int((targets[:, c] == 1).sum())
        out.positives.append(positives)
        reason = None
        if positives < min_positives:
            reason = f"{positives} known positives, under {min_positives}"
        elif out_of_fold and out_of_fold_gain(probs[:, c], targets[:, c], default) < 0:
            reason = "no gain out of fold"
        if reason:
            out.thresholds.append(default)
            out.calibrated.append(False)
            out.reasons.append(reason)
            continue
        threshold, _ = best_f1_threshold(probs[:, c], targets[:, c])
        out.thresholds.append(round(threshold, 6))
        out.calibrated.append(True)
        out.reasons.append("calibrated")
    return out


def f1_at(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | float) -> dict[str, float]:
    """CF1 / OF1 (and CP, CR, OP, OR) with one threshold per category (or one for all)."""
    from ..model.metrics import f1_scores

    shifted = torch.from_numpy(probs - np.asarray(thresholds, dtype=probs.dtype) + 0.5)  # p >= t  <=>  p - t + .5 >= .5
    return {k: float(v) for k, v in f1_scores(shifted, torch.from_numpy(targets)).items()}


def run_calibrate(checkpoint: str, vocab_store: str, overrides: list[str] = (), version: str | None = None,
                  min_positives: int = DEFAULT_MIN_POSITIVES, make_current: bool = True,
                  out_of_fold: bool = False, workers: int = 1, address: str | None = None,
                  on_cluster: bool | None = None) -> dict[str, Any]:
    """Pick thresholds on the validation split, push them as a new version; CF1 / OF1 on test before and after.

    The splits are scored as ``sarl evaluate`` scores them (``evaluate.score_split``: ``workers`` Ray tasks on a
    cluster that is connected or named, else this process); only the scores come back here.
    """
    from ..model.serving import match_trained
    from ..model.vocabulary import Vocabulary
    from .aliases import checkpoint_meta
    from .evaluate import absolute, checkpoint_job, score_split
    from .vocab_store import VocabStore

    checkpoint = absolute(checkpoint)
    job = checkpoint_job(checkpoint, list(overrides))
    scored = {}
    for split in ("val", "test"):
        shards, _ = score_split(checkpoint, job, split, workers, address, on_cluster)
        logits = np.concatenate([s["logits"] for s in shards])
        scored[split] = (torch.from_numpy(logits).float().sigmoid().numpy(),  # as served
                         np.concatenate([s["targets"] for s in shards]))
    (val_p, val_t), (test_p, test_t) = scored["val"], scored["test"]
    calibration = calibrate_thresholds(val_p, val_t, min_positives, out_of_fold=out_of_fold)
    thresholds = np.array(calibration.thresholds)
    report = {"before": f1_at(test_p, test_t, 0.5), "after": f1_at(test_p, test_t, thresholds)}
    store = VocabStore(vocab_store)
    base = store.load() if store.current_version() else None
    _, trained, _ = checkpoint_meta(checkpoint)  # the vocabulary it was trained on; no weights copied
    base = base or Vocabulary(list(trained.categories), version=trained.version)
    rows, problems = match_trained(base, trained)
    if problems:
        raise ValueError("the store's current vocabulary does not match the checkpoint: " + "; ".join(problems))
    categories = [dataclasses.replace(c, threshold=float(thresholds[row]))
                  if row is not None and calibration.calibrated[row] else c for c, row in zip(base.categories, rows)]
    new = Vocabulary(categories, version=version or f"{base.version}-calibrated")
    store.push(new, make_current=make_current)
    return {"version": new.version, "base_version": base.version, "current": make_current,
            "categories": [{"name": c.name, "threshold": t, "calibrated": ok, "val_positives": n, "reason": r}
                           for c, t, ok, n, r in zip(trained.categories, calibration.thresholds,
                                                     calibration.calibrated, calibration.positives,
                                                     calibration.reasons)],
            "test": report}


# ------------------------------------------------------------------------------------------------ completion
def complete_entries(annotated: list[str], unknown: list[str], scores: dict[str, float],
                     thresholds: dict[str, float], band: float = DEFAULT_BAND) -> dict[str, dict[str, Any]]:
    """Every category's entry for one image: annotated ones as given, unknown ones from the scores."""
    entries = {}
    for name, threshold in thresholds.items():
        score = scores.get(name)
        if name in unknown:
            if score is not None and score >= threshold + band:
                entries[name] = {"state": 1, "source": "predicted", "score": score}
            elif score is not None and score <= threshold - band:
                entries[name] = {"state": 0, "source": "predicted", "score": score}
            else:
                entries[name] = {"state": -1, "source": "unsure", "score": score}
        else:
            entries[name] = {"state": 1 if name in annotated else 0, "source": "annotated", "score": score}
    return entries


def run_complete(manifest: str, predictions: list[dict[str, Any]], thresholds: dict[str, float], output: str,
                 band: float = DEFAULT_BAND, suggest: int = 0, suggest_output: str | None = None,
                 suggest_by: str = "margin") -> dict[str, Any]:
    """Write the completed manifest (and the suggestions CSV: ``suggest`` unsure entries, picked by
    :func:`margin_order` or :func:`balanced_order`); returns counts."""
    from ..model.data.manifest import read_manifest
    from .predict import image_uri

    if suggest_by not in ("margin", "balanced"):  # before anything is written
        raise CompleteError(f"suggest_by must be margin or balanced, not {suggest_by!r}")
    by_path = {p["path"]: p for p in predictions}
    rows = read_manifest(Path(node_cache.local_copy(manifest) if storage.is_s3(manifest) else manifest))
    keys = [image_uri(manifest, row.path) for row in rows]  # as sarl predict keyed its rows
    if rows and by_path and not by_path.keys() & set(keys):
        raise CompleteError(f"no prediction matches a row of {manifest}: the predictions name images such as "
                         f"{next(iter(by_path))!r}, the manifest {keys[0]!r}; were they made from this manifest?")
    lines, uncertain = [], []
    counts = {"images": 0, "unscored": 0, "unknown_before": 0, "predicted_present": 0, "predicted_absent": 0,
              "still_unknown": 0}
    for row, key in zip(rows, keys):
        counts["images"] += 1
        counts["unknown_before"] += len(row.unknown)
        prediction = by_path.get(key)
        if prediction is None:  # unreadable (in the errors file): nothing to fill
            counts["unscored"] += 1
        entries = complete_entries(row.labels, row.unknown, (prediction or {}).get("scores", {}), thresholds, band)
        for name, e in entries.items():
            if e["source"] == "predicted":
                counts["predicted_present" if e["state"] == 1 else "predicted_absent"] += 1
            elif e["source"] == "unsure":
                counts["still_unknown"] += 1
                if e["score"] is not None:
                    uncertain.append(Scored(row.path, name, e["score"], thresholds[name]))
        # names the vocabulary does not serve are kept as annotated: present, or unknown
        lines.append(json.dumps({"path": row.path,
                                 "labels": [n for n in row.labels if n not in entries]
                                 + [n for n, e in entries.items() if e["state"] == 1],
                                 "unknown": [n for n in row.unknown if n not in entries]
                                 + [n for n, e in entries.items() if e["state"] == -1],
                                 "entries": entries}))
    storage.write_text(output, "\n".join(lines) + "\n")
    if suggest:
        picked = (margin_order(uncertain) if suggest_by == "margin"
                  else balanced_order(uncertain, list(thresholds)))[:suggest]
        out = write_suggestions(suggest_output or str(Path(output).with_suffix("")) + "-suggest.csv", picked)
        counts["suggested"], counts["suggest_file"] = len(picked), out
    counts["output"] = output
    return counts


__all__ = ["CalibrateConfig", "Calibration", "CompleteConfig", "CompleteError", "Scored", "balanced_order",
           "best_f1_threshold", "calibrate_thresholds", "complete_entries", "f1_at", "margin_order", "run_calibrate",
           "run_complete", "write_suggestions"]
