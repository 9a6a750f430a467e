"""The loss schedules seen through ``engine.train_one_epoch``, with the 1-based epochs the training loops pass.

Both ``experiment.fit`` and ``platform/train.py`` run ``for epoch in range(1, epochs + 1)`` and hand ``epoch`` to
``train_one_epoch``, which calls ``loss_fn.set_epoch(epoch)``. As in LargeLossMatters, epoch t modifies
``(t - 1) * delta_rel`` of the unknown entries (epoch 1 is plain AN), and label completion with ``warmup_epochs=W``
leaves epochs 1..W alone. A forward hook records the logits the loss actually received, and the references below
recompute the expected value from them with plain Python.
"""

from __future__ import annotations

import math

import pytest
import torch

from sarl.model import create_model, engine
from sarl.model.losses import build_loss

TARGETS = torch.tensor([[1, -1, 0], [-1, -1, 1], [0, -1, -1], [-1, 1, -1]])  # 7 unknown entries


def _bce(x: float, y: float) -> float:
    q = 1.0 / (1.0 + math.exp(-x))
    return -(y * math.log(q) + (1.0 - y) * math.log(1.0 - q))


def _cells(logits: torch.Tensor, targets: torch.Tensor):
    return [(i, j, float(logits[i, j]), int(targets[i, j])) for i in range(logits.shape[0])
            for j in range(logits.shape[1])]


def ref_large_loss(logits, targets, rate, flip):
    """AN over all B * C entries, the ceil(rate * n_unknown) largest unknown AN losses rejected (or flipped)."""
    cells = _cells(logits, targets)
    unknown = sorted(((_bce(x, 0), (i, j)) for i, j, x, t in cells if t < 0), reverse=True)
    chosen = {ij for _, ij in unknown[: math.ceil(rate * len(unknown) - 1e-9)]}
    total = 0.0
    for i, j, x, t in cells:
        if (i, j) in chosen:
            total += _bce(x, 1.0) if flip else 0.0
        else:
            total += _bce(x, max(t, 0))
    return total / len(cells)


def ref_bce_known(logits, targets):
    terms = [_bce(x, t) for _, _, x, t in _cells(logits, targets) if t >= 0]
    return sum(terms) / len(terms)


def ref_completion(logits, targets, t_pos, t_neg, weight):
    cells = _cells(logits, targets)
    total = 0.0
    for _, _, x, t in cells:
        q = 1.0 / (1.0 + math.exp(-x))
        if t < 0 and q > t_pos:
            total += _bce(x, 1.0)
        elif t < 0 and q < t_neg:
            total += _bce(x, 0.0)
    return weight * total / len(cells)


def run_epochs(loss_fn, epochs: int):
    """Train a tiny model for ``epochs`` epochs as the loops do; return, per epoch, (logits, targets, loss)."""
    torch.manual_seed(0)
    model = create_model("tiny", ["a", "b", "c"])
    images = torch.randn(4, 3, 64, 64)
    batches = [(images, TARGETS)]
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.01)
    seen = []
    handle = loss_fn.register_forward_hook(lambda _m, args, out: seen.append((args[0].detach(), args[1], out.item())))
    try:
        for epoch in range(1, epochs + 1):  # the training loops' convention
            stats = engine.train_one_epoch(model, batches, loss_fn, optimizer, "cpu", epoch, progress=False)
            assert stats["samples"] == 4
    finally:
        handle.remove()
    assert len(seen) == epochs
    return seen


@pytest.mark.parametrize("name, flip", [("ll_r", False), ("ll_ct", True)])
def test_large_loss_schedule_is_one_based_through_the_engine(name, flip):
    """delta_rel = 0.5: epoch 1 is plain AN, epoch 2 modifies ceil(0.5 * 7) = 4 unknown entries, epoch 3 all 7."""
    seen = run_epochs(build_loss(name, delta_rel=0.5), 3)
    for epoch, (logits, targets, value) in enumerate(seen, start=1):
        rate = (epoch - 1) * 0.5
        assert value == pytest.approx(ref_large_loss(logits, targets, rate, flip), rel=1e-5), f"epoch {epoch}"
    logits, targets, value = seen[0]
    assert value == pytest.approx(ref_large_loss(logits, targets, 0.0, flip), rel=1e-5)  # plain AN
    assert value != pytest.approx(ref_large_loss(logits, targets, 0.5, flip), rel=1e-5)  # not yet modified


def test_label_completion_warmup_counts_one_based_epochs_through_the_engine():
    """warmup_epochs = 2 leaves epochs 1 and 2 to the base loss; the completion term starts at epoch 3."""
    params = {"warmup_epochs": 2, "t_pos": 0.55, "t_neg": 0.5, "weight": 0.5}
    seen = run_epochs(build_loss("bce", completion=params), 3)
    for epoch, (logits, targets, value) in enumerate(seen, start=1):
        base = ref_bce_known(logits, targets)
        extra = ref_completion(logits, targets, 0.55, 0.5, 0.5)
        assert extra > 0, "the batch must hold confident unknown entries for the test to mean anything"
        expected = base + (extra if epoch > 2 else 0.0)
        assert value == pytest.approx(expected, rel=1e-5), f"epoch {epoch}"
