"""Metrics against hand-computed examples and slow references, unknown-label handling, and data-parallel sync."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sarl.model.metrics import MultiLabelMetrics, average_precision_per_class, f1_scores, mean_average_precision

# ---- slow references ----------------------------------------------------------------------------------------------


def ref_average_precision(scores: list[float], labels: list[int]) -> float:
    """scikit-learn's average_precision_score for one class, in percent: sum_n (R_n - R_{n-1}) P_n.

    Each distinct score is one threshold; unknown (-1) entries are dropped first.
    """
    pairs = [(s, y) for s, y in zip(scores, labels) if y != -1]
    n_pos = sum(y for _, y in pairs)
    if n_pos == 0:
        return math.nan
    ap, prev_recall = 0.0, 0.0
    for t in sorted({s for s, _ in pairs}, reverse=True):
        tp = sum(1 for s, y in pairs if s >= t and y == 1)
        fp = sum(1 for s, y in pairs if s >= t and y == 0)
        recall = tp / n_pos
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return 100.0 * ap


def ref_ap_per_class(scores: torch.Tensor, targets: torch.Tensor) -> list[float]:
    return [ref_average_precision(scores[:, c].tolist(), targets[:, c].tolist()) for c in range(scores.shape[1])]


def ref_f1(scores: torch.Tensor, targets: torch.Tensor, threshold: float, top_k: int | None) -> dict[str, float]:
    """Loops over images and classes; the counting rules of the metrics module, written out."""
    n, c = scores.shape
    tp, n_pred, n_gt = [0] * c, [0] * c, [0] * c
    for i in range(n):
        row = scores[i].tolist()
        top = sorted(range(c), key=lambda j: -row[j])[:top_k] if top_k else range(c)
        for j in range(c):
            y = int(targets[i, j])
            if y == -1:
                continue
            predicted = row[j] >= threshold and j in top
            n_pred[j] += predicted
            n_gt[j] += y == 1
            tp[j] += predicted and y == 1
    classes_with_pos = [j for j in range(c) if n_gt[j]]
    cp = sum(tp[j] / n_pred[j] if n_pred[j] else 0.0 for j in range(c)) / c
    cr = sum(tp[j] / n_gt[j] for j in classes_with_pos) / len(classes_with_pos)
    op, orr = sum(tp) / sum(n_pred), sum(tp) / sum(n_gt)
    out = {"CP": cp, "CR": cr, "CF1": 2 * cp * cr / (cp + cr), "OP": op, "OR": orr, "OF1": 2 * op * orr / (op + orr)}
    return {k: 100 * v for k, v in out.items()}


def make_data(seed: int = 0, n: int = 40, c: int = 6, p_known: float = 0.7, decimals: int | None = 1):
    """Random probabilities (rounded, so there are ties) and targets with unknown entries."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, c, generator=g)
    if decimals is not None:
        scores = torch.round(scores, decimals=decimals)
    labels = (torch.rand(n, c, generator=g) < 0.35).long()
    known = torch.rand(n, c, generator=g) < p_known
    return scores, torch.where(known, labels, torch.full_like(labels, -1))


# ---- average precision --------------------------------------------------------------------------------------------


def test_ap_hand_computed_with_tie_unknown_and_no_positive():
    scores = torch.tensor([[0.9, 0.9, 0.1], [0.8, 0.8, 0.2], [0.8, 0.7, 0.3], [0.5, 0.6, 0.4], [0.3, 0.5, 0.5]])
    targets = torch.tensor([[1, 0, 1], [0, 0, 1], [1, -1, 1], [-1, 0, 1], [1, 0, 1]])
    # Class 0, by score: 0.9 (+), {0.8 (-), 0.8 (+)} tied, 0.5 (unknown, dropped), 0.3 (+).
    #   precision at the positives: 1/1; 2/3 (the tie is one threshold: 2 positives among 3); 3/4.
    #   AP = (1 + 2/3 + 3/4) / 3 = 29/36.
    # Class 1 has no known positive: NaN. Class 2 has only positives: AP = 1.
    ap = average_precision_per_class(scores, targets)
    assert ap[0].item() == pytest.approx(100 * 29 / 36, rel=1e-6)
    assert math.isnan(ap[1].item())
    assert ap[2].item() == pytest.approx(100.0)
    assert mean_average_precision(scores, targets).item() == pytest.approx((100 * 29 / 36 + 100) / 2, rel=1e-6)


def test_ap_positive_ranked_below_negatives():
    # Scores 0.9 (-), 0.5 (+), 0.4 (-), 0.1 (+): precisions 1/2 and 2/4, AP = 0.5.
    scores = torch.tensor([[0.9], [0.5], [0.4], [0.1]])
    targets = torch.tensor([[0], [1], [0], [1]])
    assert average_precision_per_class(scores, targets).item() == pytest.approx(50.0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [1, 2, None])
def test_ap_matches_slow_reference(seed, decimals):
    scores, targets = make_data(seed, decimals=decimals)
    ap = average_precision_per_class(scores, targets)
    expected = torch.tensor(ref_ap_per_class(scores, targets), dtype=torch.float32)
    assert torch.allclose(ap, expected, atol=1e-4, equal_nan=True)


def test_ap_ignores_scores_of_unknown_entries():
    scores, targets = make_data(3, decimals=None)
    before = average_precision_per_class(scores, targets)
    noisy = torch.where(targets == -1, torch.rand(scores.shape, generator=torch.Generator().manual_seed(9)), scores)
    assert not torch.equal(noisy, scores)
    assert torch.allclose(average_precision_per_class(noisy, targets), before, equal_nan=True)
    assert torch.allclose(mean_average_precision(noisy, targets), mean_average_precision(scores, targets))


def test_ap_is_invariant_to_row_order():
    scores, targets = make_data(4)
    perm = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(0))
    a, b = average_precision_per_class(scores, targets), average_precision_per_class(scores[perm], targets[perm])
    assert torch.allclose(a, b, equal_nan=True)


def test_ap_is_fast_on_a_coco_sized_set():
    scores, targets = make_data(0, n=40_000, c=80, decimals=None)
    ap = average_precision_per_class(scores, targets)  # a single sort per column; well under a second
    assert ap.shape == (80,)


# ---- F1 -----------------------------------------------------------------------------------------------------------

# Two images, five classes; entry (1, 2) is unknown.
F1_SCORES = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.1], [0.2, 0.95, 0.4, 0.3, 0.55]])
F1_TARGETS = torch.tensor([[1, 0, 1, 1, 0], [0, 1, -1, 0, 1]])


def test_f1_hand_computed_threshold():
    # Predicted (>= 0.5): image 0 -> {0, 1, 2, 3}, image 1 -> {1, 4}.
    # Per class (TP / predicted, TP / positives): c0 1/1, 1/1; c1 1/2, 1/1; c2 1/1, 1/1; c3 1/1, 1/1; c4 1/1, 1/1.
    # CP = 4.5 / 5 = 0.9, CR = 1, CF1 = 1.8 / 1.9. Overall: TP 5, predicted 6, positives 5 -> OP 5/6, OR 1, OF1 10/11.
    out = f1_scores(F1_SCORES, F1_TARGETS)
    expected = {"CP": 90.0, "CR": 100.0, "CF1": 180 / 1.9, "OP": 500 / 6, "OR": 100.0, "OF1": 1000 / 11}
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-5), key


def test_f1_hand_computed_top3():
    # Top-3 and >= 0.5: image 0 -> {0, 1, 2} (0.6 of class 3 is 4th), image 1 -> top-3 {1, 4, 2}, 0.4 fails -> {1, 4}.
    # c3 now has no prediction: precision 0, recall 0. CP = 3.5 / 5 = 0.7, CR = 4 / 5 = 0.8, CF1 = 1.12 / 1.5.
    # Overall: TP 4, predicted 5, positives 5 -> OP = OR = OF1 = 0.8.
    out = f1_scores(F1_SCORES, F1_TARGETS, top_k=3)
    expected = {"CP": 70.0, "CR": 80.0, "CF1": 112 / 1.5, "OP": 80.0, "OR": 80.0, "OF1": 80.0}
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold, top_k", [(0.5, None), (0.5, 3), (0.3, None), (0.0, 2)])
def test_f1_matches_slow_reference(seed, threshold, top_k):
    scores, targets = make_data(seed, decimals=None)
    out = f1_scores(scores, targets, threshold=threshold, top_k=top_k)
    for key, value in ref_f1(scores, targets, threshold, top_k).items():
        assert out[key].item() == pytest.approx(value, rel=1e-5), key


def test_f1_ignores_unknown_entries():
    scores, targets = make_data(5, decimals=None)
    flipped = torch.where(targets == -1, 1.0 - scores, scores)
    for key, value in f1_scores(scores, targets).items():
        assert f1_scores(flipped, targets)[key].item() == pytest.approx(value.item(), rel=1e-6), key


# ---- MultiLabelMetrics --------------------------------------------------------------------------------------------

KEYS = {"mAP", "AP", "CF1", "OF1", "CP", "CR", "OP", "OR", "CF1_top3", "OF1_top3"}


def _expected(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"AP": average_precision_per_class(probs, targets), "mAP": mean_average_precision(probs, targets)}
    out.update(f1_scores(probs, targets))
    top = f1_scores(probs, targets, top_k=3)
    out["CF1_top3"], out["OF1_top3"] = top["CF1"], top["OF1"]
    return out


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == KEYS
    for key in KEYS:
        assert torch.allclose(got[key], expected[key], atol=1e-4, equal_nan=True), key


def test_module_accumulates_batches_from_logits():
    scores, targets = make_data(0, n=50, c=8, decimals=None)
    logits = torch.logit(scores.clamp(1e-4, 1 - 1e-4))
    metric = MultiLabelMetrics(num_classes=8)
    for lo, t in zip(logits.split(16), targets.split(16)):
        metric.update(lo, t)
    _assert_same(metric.compute(), _expected(torch.sigmoid(logits), targets))


def test_module_accepts_probabilities_and_resets():
    scores, targets = make_data(1, n=30, c=5)
    metric = MultiLabelMetrics(num_classes=5, from_logits=False)
    metric.update(torch.rand(4, 5), torch.ones(4, 5))
    metric.reset()
    metric.update(scores, targets)
    out = metric.compute()
    _assert_same(out, _expected(scores, targets))
    assert all(0 <= v.item() <= 100 for k, v in out.items() if k != "AP")


def test_module_rejects_wrong_class_count():
    with pytest.raises(ValueError, match="5 classes"):
        MultiLabelMetrics(num_classes=5).update(torch.zeros(2, 4), torch.zeros(2, 4))


# ---- data parallel: two CPU processes on a gloo group -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, logits, targets, expected) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        split = 23  # uneven halves: torchmetrics must gather states of different lengths
        part = slice(0, split) if rank == 0 else slice(split, None)
        metric = MultiLabelMetrics(num_classes=logits.shape[1])
        for lo, t in zip(logits[part].split(7), targets[part].split(7)):
            metric.update(lo, t)
        _assert_same(metric.compute(), expected)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters import torch, torchmetrics and sarl.model: ~20 s on 2 CPUs
@pytest.mark.timeout(180)
def test_distributed_sync_equals_single_process():
    scores, targets = make_data(2, n=41, c=6, decimals=2)
    logits = torch.logit(scores.clamp(1e-3, 1 - 1e-3))
    single = MultiLabelMetrics(num_classes=6)
    single.update(logits, targets)
    expected = single.compute()
    mp.spawn(_worker, args=(2, _free_port(), logits, targets, expected), nprocs=2, join=True)


def test_confident_logits_rank_by_logit_not_by_a_saturated_sigmoid():
    """fp32 sigmoid(x) == 1.0 for x above ~16.6: ranking probabilities would tie these six entries (AP 50)."""
    logits = torch.tensor([[30.0], [25.0], [20.0], [19.0], [18.0], [17.0]])
    targets = torch.tensor([[1], [1], [1], [0], [0], [0]])
    assert (torch.sigmoid(logits) == 1.0).all()  # the premise: every probability is exactly 1
    metric = MultiLabelMetrics(num_classes=1)
    metric.update(logits, targets)
    out = metric.compute()
    assert out["mAP"].item() == pytest.approx(100.0)
    assert out["AP"].reshape(-1)[0].item() == pytest.approx(100.0)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9])
def test_f1_on_logits_at_logit_of_the_threshold_selects_what_probabilities_select(threshold):
    """Predicted positive: p >= t, i.e. logit >= log(t / (1 - t)); written out here, away from saturation."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 5, generator=gen) * 3
    targets = torch.randint(-1, 2, (40, 5), generator=gen)
    targets[0] = 1
    metric = MultiLabelMetrics(num_classes=5, threshold=threshold)
    metric.update(logits, targets)
    out = metric.compute()
    cut = math.log(threshold / (1 - threshold))
    known = targets >= 0
    pred, gt = (logits >= cut) & known, (targets == 1) & known
    tp = (pred & gt).sum(0).double()
    op, orr = tp.sum() / pred.sum(), tp.sum() / gt.sum()
    assert out["OF1"].item() == pytest.approx(100 * float(2 * op * orr / (op + orr)), rel=1e-5)
    on_probabilities = f1_scores(torch.sigmoid(logits), targets, threshold)
    assert out["CF1"].item() == pytest.approx(on_probabilities["CF1"].item(), rel=1e-5)
