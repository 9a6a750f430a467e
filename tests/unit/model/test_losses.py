"""Partial-label losses against slow per-entry references, plus gradient, schedule and factory checks.

The references are plain Python over entries, written from the formulas (SARL.md, Durand et al. 2019, the
official ASL), not from the implementation. Epochs are 1-based, as the training loops count them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sarl.model.config import ConfigError, load_config
from sarl.model.experiment import ExperimentConfig, build_components
from sarl.model.losses import (
    LOSSES,
    AsymmetricLoss,
    LabelCompletion,
    LargeLossRejection,
    WeightedLoss,
    WithLabelCompletion,
    an_loss,
    asl_loss,
    bce_loss,
    build_loss,
    large_loss_rate,
    ll_ct_loss,
    ll_r_loss,
    partial_bce_loss,
    wan_loss,
)

# ---- slow references: plain Python over entries, no shared code with the library --------------------------------


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(x: float, y: float) -> float:
    q = _sig(x)
    return -(y * math.log(q) + (1.0 - y) * math.log(1.0 - q))


def _entries(logits: torch.Tensor, targets: torch.Tensor):
    logits = logits.detach()
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            yield i, j, float(logits[i, j]), int(targets[i, j])


def ref_bce(logits, targets):
    terms = [_bce(x, t) for _, _, x, t in _entries(logits, targets) if t >= 0]
    return sum(terms) / len(terms)


def ref_partial_bce(logits, targets):
    """Durand et al. 2019: per image, g(p_i) / C * (BCE summed over its known labels); mean over the images."""
    b, c = logits.shape
    per_image = []
    for i in range(b):
        row = [(float(logits.detach()[i, j]), int(targets[i, j])) for j in range(c)]
        known = [(x, t) for x, t in row if t >= 0]
        p_i = len(known) / c
        g = -4.45 * p_i + 5.45
        per_image.append(g / c * sum(_bce(x, t) for x, t in known))
    return sum(per_image) / b


def ref_asl(logits, targets, gamma_neg=2.0, gamma_pos=1.0, margin=0.05, eps=1e-8, reduction="sum"):
    terms = []
    for _, _, x, t in _entries(logits, targets):
        if t < 0:
            continue
        q = _sig(x)
        if t == 1:
            terms.append(-((1 - q) ** gamma_pos) * math.log(q))
        else:
            qm = max(q - margin, 0.0)
            terms.append(-(qm**gamma_neg) * math.log(max(1 - qm, eps)))
    return sum(terms) if reduction == "sum" else sum(terms) / len(terms)


def ref_an(logits, targets):
    return sum(_bce(x, max(t, 0)) for _, _, x, t in _entries(logits, targets)) / logits.numel()


def ref_wan(logits, targets):
    w = 1.0 / (logits.shape[1] - 1)
    return sum((w if t < 0 else 1.0) * _bce(x, max(t, 0)) for _, _, x, t in _entries(logits, targets)) / logits.numel()


def ref_top_unknown(logits, targets, rate):
    """The (i, j) of the ceil(rate * n_unknown) unknown entries with the largest AN loss."""
    unknown = [(_bce(x, 0), (i, j)) for i, j, x, t in _entries(logits, targets) if t < 0]
    unknown.sort(reverse=True)
    k = math.ceil(round(rate * len(unknown), 9))
    return {ij for _, ij in unknown[:k]}


def ref_ll(logits, targets, rate, flip):
    chosen = ref_top_unknown(logits, targets, rate)
    total = 0.0
    for i, j, x, t in _entries(logits, targets):
        if (i, j) in chosen:
            total += _bce(x, 1) if flip else 0.0
        else:
            total += _bce(x, max(t, 0))
    return total / logits.numel()


# ---- fixtures -----------------------------------------------------------------------------------------------------


def make_batch(seed: int = 0, b: int = 6, c: int = 7, p_known: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, c, generator=g, dtype=torch.float64) * 2.5).requires_grad_(True)
    labels = (torch.rand(b, c, generator=g) < 0.3).long()
    known = torch.rand(b, c, generator=g) < p_known
    targets = torch.where(known, labels, torch.full_like(labels, -1))
    return logits, targets


SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "fn, ref",
    [
        (bce_loss, ref_bce),
        (partial_bce_loss, ref_partial_bce),
        (asl_loss, ref_asl),
        (an_loss, ref_an),
        (wan_loss, ref_wan),
    ],
)
def test_loss_matches_reference(fn, ref, seed):
    logits, targets = make_batch(seed)
    assert fn(logits, targets).item() == pytest.approx(ref(logits, targets), rel=1e-10)


@pytest.mark.parametrize(
    "params",
    [{"gamma_neg": 4.0, "gamma_pos": 0.0, "margin": 0.2}, {"margin": 0.0}, {"reduction": "mean"},
     {"reduction": "sum", "margin": 0.1}],
)
def test_asl_parameters_match_reference(params):
    logits, targets = make_batch(3)
    assert asl_loss(logits, targets, **params).item() == pytest.approx(ref_asl(logits, targets, **params), rel=1e-10)


# ---- ASL on a 2 x 3 case worked out by hand ------------------------------------------------------------------------
# gamma_neg = 2, gamma_pos = 1, margin m = 0.05. Entry by entry, with q = sigmoid(z) and q_m = max(q - m, 0):
#   positive:  loss = -(1 - q) * log q;       weight w = 1 - q held constant:  d/dz = -w * (1 - q) = -(1 - q)^2
#   negative:  loss = -q_m^2 * log(1 - q_m);  weight w = q_m^2 held constant, dq_m/dz = q (1 - q) when q > m:
#              d/dz = w * q (1 - q) / (1 - q_m);  for q <= m the loss is 0 and so is its gradient.
# Without detaching, the weights' own derivatives add
#   positive:  +gamma_pos (1 - q)^(gamma_pos - 1) * q (1 - q) * log q            = q (1 - q) log q
#   negative:  -gamma_neg q_m^(gamma_neg - 1) * q (1 - q) * log(1 - q_m)         = -2 q_m q (1 - q) log(1 - q_m)

ASL_LOGITS = [[1.0, -0.5, 2.0], [0.3, -2.0, -4.0]]
ASL_TARGETS = [[1, 0, -1], [0, 1, 0]]  # (0, 2) unknown; (1, 2) an easy negative, q = 0.018 < m


def _hand_asl_entry(z: float, t: int, m: float = 0.05):
    """(loss, gradient with detached weights, gradient with the weights differentiated) of one entry."""
    q = 1.0 / (1.0 + math.exp(-z))
    if t < 0:
        return 0.0, 0.0, 0.0
    if t == 1:
        loss = -(1.0 - q) * math.log(q)
        detached = -(1.0 - q) * (1.0 - q)
        return loss, detached, detached + q * (1.0 - q) * math.log(q)
    q_m = max(q - m, 0.0)
    if q_m == 0.0:
        return 0.0, 0.0, 0.0
    loss = -(q_m**2) * math.log(1.0 - q_m)
    detached = q_m**2 * q * (1.0 - q) / (1.0 - q_m)
    return loss, detached, detached - 2.0 * q_m * q * (1.0 - q) * math.log(1.0 - q_m)


def _hand_asl():
    cells = [[_hand_asl_entry(z, t) for z, t in zip(zs, ts)] for zs, ts in zip(ASL_LOGITS, ASL_TARGETS)]
    total = sum(loss for row in cells for loss, _, _ in row)
    detached = [[g for _, g, _ in row] for row in cells]
    full = [[g for _, _, g in row] for row in cells]
    return total, detached, full


@pytest.mark.parametrize("reduction, n", [("sum", 1), ("mean", 5)])  # 5 known entries, the easy negative included
def test_asl_value_and_gradient_by_hand(reduction, n):
    logits = torch.tensor(ASL_LOGITS, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor(ASL_TARGETS)
    total, detached, full = _hand_asl()
    loss = asl_loss(logits, targets, gamma_neg=2.0, gamma_pos=1.0, margin=0.05, reduction=reduction)
    assert loss.item() == pytest.approx(total / n, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = torch.tensor(detached, dtype=torch.float64) / n
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-15)
    # The focusing weights are constants: differentiating them would give a visibly different gradient.
    not_detached = torch.tensor(full, dtype=torch.float64) / n
    learnt = torch.tensor([[True, True, False], [True, True, False]])
    assert torch.all((grad[learnt] - not_detached[learnt]).abs() > 1e-3 / n)
    # The unknown entry and the easy negative give no gradient.
    assert grad[0, 2] == 0 and grad[1, 2] == 0


def test_asl_default_is_the_sum_and_modules_agree():
    logits = torch.tensor(ASL_LOGITS, dtype=torch.float64)
    targets = torch.tensor(ASL_TARGETS)
    total, _, _ = _hand_asl()
    assert asl_loss(logits, targets).item() == pytest.approx(total, rel=1e-12)
    assert build_loss("asl")(logits, targets).item() == pytest.approx(total, rel=1e-12)
    assert build_loss("asl", reduction="sum")(logits, targets).item() == pytest.approx(total, rel=1e-12)
    assert build_loss("asl", reduction="mean")(logits, targets).item() == pytest.approx(total / 5, rel=1e-12)
    assert AsymmetricLoss(reduction="mean")(logits, targets).item() == pytest.approx(total / 5, rel=1e-12)


def test_asl_unknown_entries_give_zero_loss_and_gradient():
    targets = torch.tensor(ASL_TARGETS)
    base = torch.tensor(ASL_LOGITS, dtype=torch.float64)
    for value in (-8.0, 0.0, 8.0):  # whatever the unknown entry's logit, nothing changes
        logits = base.clone()
        logits[0, 2] = value
        logits.requires_grad_(True)
        loss = asl_loss(logits, targets)
        assert loss.item() == pytest.approx(_hand_asl()[0], rel=1e-12)
        assert torch.autograd.grad(loss, logits)[0][0, 2] == 0


def test_asl_unknown_reduction_is_an_error():
    with pytest.raises(ValueError, match="reduction"):
        asl_loss(torch.zeros(1, 2), torch.zeros(1, 2), reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        build_loss("asl", reduction="avg")


# ---- partial BCE: each image weighted by its own known proportion --------------------------------------------------


def test_partial_bce_uses_each_images_known_proportion():
    logits = torch.tensor(
        [[1.5, -0.5, 2.0, 0.1], [0.3, -1.2, 0.8, -2.0], [0.4, 0.4, -0.4, 1.0], [-0.7, -1.5, 0.2, 3.0]],
        dtype=torch.float64,
    )
    targets = torch.tensor([[1, 0, -1, -1], [0, 1, 1, 0], [-1, -1, -1, -1], [-1, 0, -1, -1]])
    # p_i = 1/2, 1, 0, 1/4; image 3 has no known label: it contributes 0 and still counts among the 4.
    rows = [[(1.5, 1), (-0.5, 0)], [(0.3, 0), (-1.2, 1), (0.8, 1), (-2.0, 0)], [], [(-1.5, 0)]]
    per_image = [(-4.45 * len(r) / 4 + 5.45) / 4 * sum(_bce(x, t) for x, t in r) for r in rows]
    expected = sum(per_image) / 4
    value = partial_bce_loss(logits, targets).item()
    assert value == pytest.approx(expected, rel=1e-12)
    assert value == pytest.approx(ref_partial_bce(logits, targets), rel=1e-12)
    # The batch-proportion variant (one g(p) for p = 7/16 over the whole batch) is a different number.
    batch_p = (-4.45 * 7 / 16 + 5.45) * sum(_bce(x, t) for r in rows for x, t in r) / 16
    assert abs(value - batch_p) > 1e-3
    assert build_loss("partial_bce")(logits, targets).item() == pytest.approx(expected, rel=1e-12)


def test_partial_bce_gradient_is_scaled_per_image():
    """d/dz of image i's entry is g(p_i) / (B * C) * (q - y): the weight follows the image, not the batch."""
    logits = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.3, -0.4]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, -1, -1], [0, 1, 0]])  # p = 1/3 and 1
    (grad,) = torch.autograd.grad(partial_bce_loss(logits, targets), logits)
    g0, g1 = -4.45 / 3 + 5.45, 1.0
    assert grad[0, 0].item() == pytest.approx(g0 / 6 * (_sig(0.5) - 1), rel=1e-12)
    assert grad[0, 1] == 0 and grad[0, 2] == 0
    for j, (z, y) in enumerate([(2.0, 0), (0.3, 1), (-0.4, 0)]):
        assert grad[1, j].item() == pytest.approx(g1 / 6 * (_sig(z) - y), rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 1.0])
def test_large_loss_matches_reference(seed, rate):
    logits, targets = make_batch(seed)
    assert ll_r_loss(logits, targets, rate).item() == pytest.approx(
        ref_ll(logits, targets, rate, flip=False), rel=1e-10
    )
    assert ll_ct_loss(logits, targets, rate).item() == pytest.approx(
        ref_ll(logits, targets, rate, flip=True), rel=1e-10
    )


def test_complete_labels_reduce_to_plain_bce():
    """With every label known, bce, partial_bce (g(1) = 1), an and wan all equal the ordinary BCE mean."""
    logits, targets = make_batch(0, p_known=1.1)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.double())
    for fn in (bce_loss, partial_bce_loss, an_loss, wan_loss):
        assert fn(logits, targets).item() == pytest.approx(plain.item(), rel=1e-12)


def test_float_and_long_targets_agree():
    logits, targets = make_batch(0)
    for fn in (bce_loss, partial_bce_loss, asl_loss, an_loss, wan_loss):
        assert fn(logits, targets).item() == fn(logits, targets.double()).item()


# ---- gradients ----------------------------------------------------------------------------------------------------


def _grad(fn, logits, targets, **kw):
    (grad,) = torch.autograd.grad(fn(logits, targets, **kw), logits)
    return grad


@pytest.mark.parametrize("fn", [bce_loss, partial_bce_loss, asl_loss])
def test_known_only_losses_ignore_unknown_entries(fn):
    logits, targets = make_batch(1)
    grad = _grad(fn, logits, targets)
    unknown = targets < 0
    assert torch.all(grad[unknown] == 0)
    # Known entries do learn (ASL's shifted negatives may be exactly flat, so look at positives there).
    learnt = (targets == 1) if fn is asl_loss else ~unknown
    assert torch.all(grad[learnt] != 0)


@pytest.mark.parametrize("fn", [an_loss, wan_loss])
def test_assume_negative_losses_learn_from_unknown_entries(fn):
    logits, targets = make_batch(1)
    grad = _grad(fn, logits, targets)
    assert torch.all(grad[targets < 0] > 0)  # pushed towards "absent"


def test_wan_weights_unknown_gradients_by_one_over_c_minus_one():
    logits, targets = make_batch(1)
    ratio = _grad(wan_loss, logits, targets) / _grad(an_loss, logits, targets)
    c = logits.shape[1]
    assert torch.allclose(ratio[targets < 0], torch.full_like(ratio[targets < 0], 1 / (c - 1)))
    assert torch.allclose(ratio[targets >= 0], torch.ones_like(ratio[targets >= 0]))


def test_all_unknown_batch_gives_zero_loss_and_gradient():
    logits, _ = make_batch(0)
    targets = torch.full(logits.shape, -1)
    for fn in (bce_loss, partial_bce_loss, asl_loss):
        loss = fn(logits, targets)
        assert loss.item() == 0.0
        assert torch.all(torch.autograd.grad(loss, logits)[0] == 0)


def test_ll_r_rejects_exactly_the_top_rate_unknown_entries():
    logits, targets = make_batch(2, b=8, c=10)
    n_unknown = int((targets < 0).sum())
    rate = 0.25
    chosen = ref_top_unknown(logits, targets, rate)
    assert len(chosen) == math.ceil(rate * n_unknown) > 0
    grad = _grad(ll_r_loss, logits, targets, rate=rate)
    zero = {(i, j) for i, j in (grad == 0).nonzero().tolist()}
    assert zero == chosen


def test_ll_ct_flips_the_top_rate_unknown_entries():
    logits, targets = make_batch(2, b=8, c=10)
    rate = 0.25
    flipped = targets.clone()
    for i, j in ref_top_unknown(logits, targets, rate):
        flipped[i, j] = 1
    assert ll_ct_loss(logits, targets, rate).item() == pytest.approx(an_loss(logits, flipped).item(), rel=1e-12)
    grad = _grad(ll_ct_loss, logits, targets, rate=rate)
    for i, j in ref_top_unknown(logits, targets, rate):
        assert grad[i, j] < 0  # now pushed towards "present"


def test_rate_counts_are_exact_fractions_of_unknown_entries():
    """0.3 * 10 unknown entries is 3, not ceil(3.0000000000000004) = 4."""
    logits = torch.linspace(-3, 3, 10, dtype=torch.float64).reshape(1, 10).requires_grad_(True)
    targets = torch.full((1, 10), -1)
    grad = _grad(ll_r_loss, logits, targets, rate=0.3)
    assert (grad == 0).nonzero()[:, 1].tolist() == [7, 8, 9]  # the three largest logits have the largest AN loss


def test_rate_schedule_is_one_based():
    """Epoch t (1-based, as the loops count) modifies (t - 1) * delta_rel of the unknown entries."""
    assert large_loss_rate(1, 0.002) == 0.0
    assert large_loss_rate(11, 0.002) == pytest.approx(0.02)
    assert large_loss_rate(100, 0.05, max_rate=0.4) == 0.4
    logits, targets = make_batch(0)
    for name, flip in (("ll_r", False), ("ll_ct", True)):
        loss = build_loss(name, delta_rel=0.1, max_rate=0.5)
        assert loss.epoch == 1 and loss.rate == 0.0  # before any set_epoch: epoch 1
        assert loss(logits, targets).item() == pytest.approx(ref_an(logits, targets), rel=1e-10)
        loss.set_epoch(1)
        assert loss.rate == 0.0
        assert loss(logits, targets).item() == pytest.approx(ref_an(logits, targets), rel=1e-10)  # epoch 1 is AN
        loss.set_epoch(3)
        assert loss.rate == pytest.approx(0.2)
        assert loss(logits, targets).item() == pytest.approx(ref_ll(logits, targets, 0.2, flip), rel=1e-10)
        loss.set_epoch(10)
        assert loss.rate == 0.5


def test_rate_out_of_range_is_an_error():
    logits, targets = make_batch(0)
    with pytest.raises(ValueError, match="rate"):
        ll_r_loss(logits, targets, 1.5)


# ---- label completion ---------------------------------------------------------------------------------------------


def ref_completion(logits, targets, t_pos, t_neg, weight):
    total = 0.0
    for _, _, x, t in _entries(logits, targets):
        if t >= 0:
            continue
        q = _sig(x)
        if q > t_pos:
            total += _bce(x, 1)
        elif q < t_neg:
            total += _bce(x, 0)
    return weight * total / logits.numel()


def test_label_completion_only_after_warmup():
    logits, targets = make_batch(0)
    params = {"warmup_epochs": 2, "t_pos": 0.8, "t_neg": 0.2, "weight": 0.5}
    loss = build_loss("bce", completion=params)
    assert isinstance(loss, WithLabelCompletion)
    base = ref_bce(logits, targets)
    assert ref_completion(logits, targets, 0.8, 0.2, 0.5) > 0  # the batch has confident unknown entries
    assert loss(logits, targets).item() == pytest.approx(base, rel=1e-12)  # default epoch 1
    for epoch in (1, 2):  # warmup_epochs = 2: epochs 1 and 2 are left alone
        loss.set_epoch(epoch)
        assert loss(logits, targets).item() == pytest.approx(base, rel=1e-12)
    loss.set_epoch(3)
    expected = base + ref_completion(logits, targets, 0.8, 0.2, 0.5)
    assert loss(logits, targets).item() == pytest.approx(expected, rel=1e-10)


def test_label_completion_gradient_reaches_only_confident_unknown_entries():
    logits, targets = make_batch(0)
    completion = LabelCompletion(warmup_epochs=0, t_pos=0.8, t_neg=0.2, weight=1.0)
    grad = _grad(completion, logits, targets)
    prob = torch.sigmoid(logits.detach())
    confident = (targets < 0) & ((prob > 0.8) | (prob < 0.2))
    assert torch.all(grad[~confident] == 0)
    assert torch.all(grad[confident] != 0)
    assert torch.all(grad[confident & (prob > 0.8)] < 0)  # soft positives pushed up


def test_label_completion_forwards_epoch_to_base():
    loss = build_loss("ll_r", delta_rel=0.1, completion={"warmup_epochs": 1})
    assert not loss.completion.active and loss.base.rate == 0.0  # default epoch 1
    loss.set_epoch(2)
    assert loss.completion.active and loss.base.rate == pytest.approx(0.1)
    loss.set_epoch(4)
    assert loss.base.rate == pytest.approx(0.3)
    assert loss.completion.active


def test_label_completion_without_warmup_is_active_from_epoch_one():
    completion = LabelCompletion(warmup_epochs=0)
    assert completion.epoch == 1 and completion.active


def test_label_completion_validates_thresholds():
    with pytest.raises(ValueError, match="t_neg"):
        LabelCompletion(t_pos=0.2, t_neg=0.8)


# ---- factory ------------------------------------------------------------------------------------------------------


def test_registry_names():
    assert set(LOSSES) == {"bce", "partial_bce", "asl", "an", "wan", "ll_r", "ll_ct"}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_build_every_loss(name):
    loss = build_loss(name)
    assert isinstance(loss, torch.nn.Module)
    loss.set_epoch(3)
    logits, targets = make_batch(0)
    value = loss(logits, targets)
    assert value.dim() == 0 and torch.isfinite(value)


def test_build_loss_passes_parameters():
    logits, targets = make_batch(0)
    loss = build_loss("asl", gamma_neg=4.0, gamma_pos=0.0, margin=0.2, reduction="mean")
    expected = ref_asl(logits, targets, 4.0, 0.0, 0.2, reduction="mean")
    assert loss(logits, targets).item() == pytest.approx(expected, rel=1e-10)


def test_build_loss_unknown_name():
    with pytest.raises(ValueError, match=r"'focal'.*valid.*'an'.*'asl'.*'bce'.*'ll_ct'.*'ll_r'.*'partial_bce'.*'wan'"):
        build_loss("focal")


def test_build_loss_unknown_parameter():
    with pytest.raises(ValueError, match=r"gama_neg.*valid.*gamma_neg"):
        build_loss("asl", gama_neg=3.0)
    with pytest.raises(ValueError, match=r"delta_rel"):
        build_loss("bce", delta_rel=0.1)


def test_build_loss_unknown_completion_parameter():
    with pytest.raises(ValueError, match=r"tpos.*valid.*t_pos"):
        build_loss("bce", completion={"tpos": 0.9})


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="B, C"):
        bce_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ---- loss weight: DualCoOp's loss_w (utils/trainers.py: loss = args.loss_w * criterion(...)) -----------------------


def test_weight_multiplies_the_summed_asl_as_dualcoops_loss_w():
    logits, targets = make_batch(4)
    loss = build_loss("asl", weight=0.03)(logits, targets)
    assert loss.item() == pytest.approx(0.03 * ref_asl(logits, targets, reduction="sum"), rel=1e-10)
    # On the case worked out by hand: value and gradient are 0.03 x the summed ASL's.
    hand = torch.tensor(ASL_LOGITS, dtype=torch.float64, requires_grad=True)
    total, detached, _ = _hand_asl()
    weighted = build_loss("asl", weight=0.03)(hand, torch.tensor(ASL_TARGETS))
    assert weighted.item() == pytest.approx(0.03 * total, rel=1e-12)
    (grad,) = torch.autograd.grad(weighted, hand)
    assert torch.allclose(grad, 0.03 * torch.tensor(detached, dtype=torch.float64), rtol=1e-10, atol=1e-15)


def test_weight_multiplies_base_and_completion_and_passes_the_epoch_on():
    logits, targets = make_batch(0)
    completion = {"warmup_epochs": 2, "t_pos": 0.8, "t_neg": 0.2, "weight": 0.5}
    loss = build_loss("ll_r", completion=completion, weight=0.2, delta_rel=0.1)
    assert isinstance(loss, WeightedLoss) and isinstance(loss.base, WithLabelCompletion)
    loss.set_epoch(3)  # rate 0.2, completion active
    assert loss.base.base.rate == pytest.approx(0.2) and loss.base.completion.active
    extra = ref_completion(logits, targets, 0.8, 0.2, 0.5)
    assert extra > 0
    expected = 0.2 * (ref_ll(logits, targets, 0.2, flip=False) + extra)  # the whole loss times the weight
    assert loss(logits, targets).item() == pytest.approx(expected, rel=1e-10)


def test_default_weight_leaves_the_loss_as_it_was():
    assert type(build_loss("asl")) is AsymmetricLoss and type(build_loss("asl", weight=1.0)) is AsymmetricLoss
    assert load_config(ExperimentConfig, None, []).loss.weight == 1.0


@pytest.mark.parametrize("weight", [0, -0.03])
def test_weight_must_be_positive(weight):
    with pytest.raises(ValueError, match="weight must be > 0"):
        build_loss("asl", weight=weight)
    with pytest.raises(ConfigError, match=r"^loss\.weight: .* should be greater than 0"):
        load_config(ExperimentConfig, None, [f"loss.weight={weight}"])


def test_the_experiment_trains_with_the_configured_weight():
    cfg = load_config(ExperimentConfig, None, ["loss.weight=0.03", "model.rank=8"])
    _, loss_fn, _, _ = build_components(cfg, ["circle", "square", "red car"], steps_per_epoch=10)
    logits, targets = make_batch(5, c=3)
    assert loss_fn(logits, targets).item() == pytest.approx(0.03 * ref_asl(logits, targets), rel=1e-10)


# ---- large-loss count: ours ceil(rate * n_unknown), LargeLossMatters' ceil(B * C * (1 - clean_rate)) ---------------


def ref_top_k_unknown(logits, targets, k):
    """The (i, j) of the k unknown entries with the largest AN loss."""
    unknown = sorted(((_bce(x, 0), (i, j)) for i, j, x, t in _entries(logits, targets) if t < 0), reverse=True)
    return {ij for _, ij in unknown[:k]}


def _rejected(logits, targets, rate, **kw):
    """The entries LL-R gives zero gradient (every other entry's BCE gradient is nonzero)."""
    return {(i, j) for i, j in (_grad(ll_r_loss, logits, targets, rate=rate, **kw) == 0).nonzero().tolist()}


def test_count_all_rejects_ceil_rate_times_all_entries_as_the_official_code():
    logits, targets = make_batch(2, b=8, c=10)
    b, c = logits.shape
    rate = 0.15
    k = math.ceil(round(rate * b * c, 9))  # LargeLossMatters: ceil(batch_size * num_classes * (1 - clean_rate))
    assert k == 12 and k != math.ceil(round(rate * int((targets < 0).sum()), 9))
    assert _rejected(logits, targets, rate, count="all") == ref_top_k_unknown(logits, targets, k)
    flipped = targets.clone()
    for i, j in ref_top_k_unknown(logits, targets, k):
        flipped[i, j] = 1
    assert ll_ct_loss(logits, targets, rate, count="all").item() == pytest.approx(
        an_loss(logits, flipped).item(), rel=1e-12)
    module = build_loss("ll_r", delta_rel=0.075, count="all")
    module.set_epoch(3)  # rate 2 x 0.075 = 0.15
    assert module(logits, targets).item() == pytest.approx(ll_r_loss(logits, targets, rate, count="all").item())


def test_count_all_is_capped_at_the_unknown_entries():
    logits, targets = make_batch(2, b=8, c=10)
    unknown = {(i, j) for i, j in (targets < 0).nonzero().tolist()}
    assert len(unknown) < math.ceil(0.9 * logits.numel())
    assert _rejected(logits, targets, 0.9, count="all") == unknown  # no known entry is ever rejected


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1, 0.33])
def test_counts_agree_within_ceil_rate_b_for_single_positive_labels(rate):
    """One known positive per image, the rest unknown (what LargeLossMatters was written for): n_unknown = BC - B."""
    b, c = 16, 20
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(b, c, generator=g, dtype=torch.float64) * 2.5).requires_grad_(True)
    targets = torch.full((b, c), -1)
    targets[torch.arange(b), torch.randint(c, (b,), generator=g)] = 1
    n_all = len(_rejected(logits, targets, rate, count="all"))
    n_ours = len(_rejected(logits, targets, rate))
    assert n_all == math.ceil(round(rate * b * c, 9)) and n_ours == math.ceil(round(rate * (b * c - b), 9))
    assert 0 <= n_all - n_ours <= math.ceil(rate * b)


def test_count_all_doubles_the_rejected_fraction_at_half_known_labels():
    logits, _ = make_batch(3, b=8, c=10)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(10), indexing="ij")
    targets = torch.where((rows + cols) % 2 == 0, 0, -1)  # p = 0.5: 40 known, 40 unknown
    n_all, n_ours = (len(_rejected(logits, targets, 0.1, **kw)) for kw in ({"count": "all"}, {}))
    assert (n_ours, n_all) == (4, 8)  # rate / (1 - p) = 0.2 of the unknown entries instead of 0.1


def test_default_count_is_unchanged():
    logits, targets = make_batch(1, b=8, c=10)
    assert LargeLossRejection().count == "unknown" and build_loss("ll_ct").count == "unknown"
    for rate in (0.1, 0.25):
        assert ll_r_loss(logits, targets, rate).item() == pytest.approx(ref_ll(logits, targets, rate, False), rel=1e-12)
        assert ll_ct_loss(logits, targets, rate).item() == pytest.approx(ref_ll(logits, targets, rate, True), rel=1e-12)
        assert _rejected(logits, targets, rate) == _rejected(logits, targets, rate, count="unknown")


def test_unknown_count_is_an_error():
    with pytest.raises(ValueError, match="count 'batch'.*'unknown', 'all'"):
        build_loss("ll_r", count="batch")
    logits, targets = make_batch(0)
    with pytest.raises(ValueError, match="count"):
        ll_r_loss(logits, targets, 0.1, count="entries")


# ---- the jobs' loss scale -----------------------------------------------------------------------------------------

JOBS = Path(__file__).resolve().parents[3] / "jobs"


@pytest.mark.parametrize("name, lr, proportion, weight", [
    ("voc2007_dualcoop_rn101", 0.001, 0.5, 0.03),  # README: lr 0.001 for VOC2007; loss_w 0.03 at pp 0.5
    ("coco2014_dualcoop_rn101", 0.002, 0.5, 0.03),  # README's example: --lr 0.002 --loss_w 0.03 -pp 0.5
    ("voc2007_rn101", 0.001, 0.1, 0.15),  # loss_w x p kept at 0.03 x 0.5
    ("coco2014_rn101", 0.002, 0.1, 0.15),
])
def test_jobs_sum_asl_at_dualcoops_lr_and_loss_weight(name, lr, proportion, weight):
    from sarl.platform.job import load_job

    job = load_job(JOBS / f"{name}.yaml")
    assert (job.loss.name, job.loss.params["reduction"], job.loss.params["gamma_neg"], job.loss.params["gamma_pos"],
            job.loss.params["margin"]) == ("asl", "sum", 2.0, 1.0, 0.05)
    assert (job.optim.lr, job.optim.lr_batch_size, job.train.batch_size, job.train.epochs) == (lr, 32, 32, 50)
    assert job.data.known_proportion == proportion and job.loss.weight == pytest.approx(weight)
    assert job.loss.weight * job.data.known_proportion == pytest.approx(0.03 * 0.5)
    assert job.model["head"] == ("dualcoop" if "dualcoop" in name else "sarl")


def test_the_sweep_compares_every_loss_as_a_mean_at_weight_one():
    """A mean over entries gives the same loss for a batch and for that batch twice over; a sum doubles."""
    from sarl.platform.tune import load_sweep, trial_job

    sweep, job = load_sweep(JOBS / "sweep_voc2007.yaml")
    logits, targets = make_batch(6)
    twice = torch.cat([logits, logits]).detach(), torch.cat([targets, targets])
    names = sweep.space["loss.name"]["choice"]
    assert set(names) == set(LOSSES)
    for name in names:
        params = {"loss.name": name}
        for key, spec in sweep.space.items():  # the loss's own (conditional) parameters, at their first value
            wanted = (spec.get("when") or {}).get("loss.name", [])
            if key.startswith("loss.params.") and name in (wanted if isinstance(wanted, list) else [wanted]):
                params[key] = next(iter(spec.get("choice") or spec.get("uniform") or spec.get("loguniform")))
        trial = trial_job(job, sweep.space, params).loss
        assert trial.weight == 1.0, name
        fn = build_loss(trial.name, completion=trial.completion, weight=trial.weight, **trial.params)
        fn.set_epoch(1)
        assert fn(*twice).item() == pytest.approx(fn(logits, targets).item(), rel=1e-10), name
