"""Partial-label losses for multi-label recognition: a functional core and thin modules chosen by name.

Every loss takes ``logits`` of shape (B, C) and ``targets`` of the same shape with values
1 = present, 0 = absent, -1 = unknown (float or long), and returns a scalar. The
normalisation of each loss is stated in its docstring; in short:

- ``bce``: mean over the known entries (unknown entries give zero loss and zero gradient).
- ``asl``: sum over the known entries, as the official ASL and DualCoOp (``reduction="mean"``
  divides by the number of known entries instead).
- ``partial_bce``: Durand et al. (CVPR 2019), per image ``g(p_i) / C * sum over its known
  entries`` with ``p_i`` the image's known proportion, averaged over the B images.
- ``an``, ``wan``, ``ll_r``, ``ll_ct``: mean over all B * C entries (unknown entries are assumed negative).

``build_loss(name, weight=w)`` multiplies the whole loss by ``w``, as DualCoOp's ``loss_w`` multiplies its
summed ASL (``utils/trainers.py``: ``loss = args.loss_w * criterion(...)``).

Modules expose ``set_epoch(epoch)`` (1-based, as both training loops count: ``range(1, epochs + 1)``;
1 before any call) so that epoch-dependent losses (the large-loss schedule, label completion)
need no other hook.

Example:
    >>> import torch
    >>> loss_fn = build_loss("asl", gamma_neg=4.0)
    >>> logits = torch.tensor([[2.0, -1.0, 0.5]])
    >>> targets = torch.tensor([[1, 0, -1]])
    >>> loss_fn.set_epoch(1)
    >>> loss_fn(logits, targets).shape
    torch.Size([])
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSSES",
    "AssumeNegativeLoss",
    "AsymmetricLoss",
    "KnownBCELoss",
    "LabelCompletion",
    "LargeLossCorrection",
    "LargeLossRejection",
    "PartialBCELoss",
    "PartialLoss",
    "WeakAssumeNegativeLoss",
    "WeightedLoss",
    "WithLabelCompletion",
    "an_loss",
    "asl_loss",
    "bce_loss",
    "build_loss",
    "large_loss_count",
    "large_loss_rate",
    "ll_ct_loss",
    "ll_r_loss",
    "partial_bce_loss",
    "wan_loss",
]


def _check(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Validate shapes; return (float 0/1 targets with unknown set to 0, known mask, unknown mask)."""
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits and targets must both be (B, C); got {tuple(logits.shape)}, {tuple(targets.shape)}")
    known = targets >= 0
    unknown = ~known
    y = targets.clamp(min=0).to(logits.dtype)
    return y, known, unknown


def _zero(logits: Tensor) -> Tensor:
    """A zero that stays attached to the graph, for batches with nothing to learn from."""
    return logits.sum() * 0.0


def _bce_matrix(logits: Tensor, y: Tensor) -> Tensor:
    """Element-wise binary cross-entropy with logits (numerically stable)."""
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none")


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy over the known entries only, averaged over the known entries."""
    y, known, _ = _check(logits, targets)
    n_known = int(known.sum())
    if n_known == 0:
        return _zero(logits)
    return torch.where(known, _bce_matrix(logits, y), 0.0).sum() / n_known


def partial_bce_loss(logits: Tensor, targets: Tensor, alpha: float = -4.45, beta: float = 5.45) -> Tensor:
    """Partial BCE of Durand et al. (CVPR 2019): known-only BCE re-weighted by each image's known proportion.

    Image i's loss is ``g(p_i) / C * sum over its known labels c of bce_ic``, with ``p_i`` the
    fraction of image i's C labels that are known and ``g(p) = alpha * p + beta`` (``g(1) = 1``,
    so with complete labels this is the ordinary BCE mean; ``g(0.1) = 5``). The batch loss is the
    mean over the B images; an image with no known label contributes 0 and still counts in the
    mean. Dividing by ``C`` (not by the known count) is what ``g`` was fitted for: the weight grows
    as labels vanish, but slower than ``1 / p_i`` would.
    """
    y, known, _ = _check(logits, targets)
    if not bool(known.any()):
        return _zero(logits)
    num_classes = logits.shape[1]
    p = known.sum(dim=1, keepdim=True).to(logits.dtype) / num_classes  # (B, 1) per-image known proportion
    g = alpha * p + beta
    per_image = (g * torch.where(known, _bce_matrix(logits, y), 0.0)).sum(dim=1) / num_classes
    return per_image.mean()


_REDUCTIONS = ("sum", "mean")


def asl_loss(
    logits: Tensor,
    targets: Tensor,
    gamma_neg: float = 2.0,
    gamma_pos: float = 1.0,
    margin: float = 0.05,
    eps: float = 1e-8,
    reduction: str = "sum",
) -> Tensor:
    """Asymmetric loss (Ridnik et al., ICCV 2021) over the known entries.

    Positives: ``-(1 - q)^gamma_pos * log q``; negatives: ``-q_m^gamma_neg * log(1 - q_m)`` with
    the shifted probability ``q_m = max(q - margin, 0)``, which discards easy negatives (zero loss
    and gradient for ``q <= margin``). ``eps`` floors ``1 - q_m`` inside the log. The focusing
    weights ``(1 - q)^gamma_pos`` and ``q_m^gamma_neg`` are detached, as in the official ASL and
    DualCoOp (``disable_torch_grad_focal_loss=True``): they scale each entry's gradient but are not
    differentiated themselves. ``reduction="sum"`` (the default) sums over the known entries as
    both references do, so their learning rates carry over; ``"mean"`` divides by the number of
    known entries, which makes the scale independent of batch size and known proportion.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {list(_REDUCTIONS)}")
    y, known, _ = _check(logits, targets)
    n_known = int(known.sum())
    if n_known == 0:
        return _zero(logits)
    q = torch.sigmoid(logits)
    with torch.no_grad():
        w_pos = (1.0 - q) ** gamma_pos
    pos = -w_pos * F.logsigmoid(logits)
    if margin > 0:
        q_m = (q - margin).clamp(min=0.0)
        with torch.no_grad():
            w_neg = q_m**gamma_neg
        neg = -w_neg * torch.log((1.0 - q_m).clamp(min=eps))
    else:
        with torch.no_grad():
            w_neg = q**gamma_neg
        neg = -w_neg * F.logsigmoid(-logits)
    total = torch.where(known, torch.where(y > 0, pos, neg), 0.0).sum()
    return total if reduction == "sum" else total / n_known


def an_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Assume negative: BCE with every unknown entry taken as absent, averaged over all B * C entries."""
    y, _, _ = _check(logits, targets)
    return _bce_matrix(logits, y).mean()


def wan_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Weak assume negative (Cole et al., CVPR 2021): AN with unknown terms weighted ``1 / (C - 1)``.

    Known entries keep weight 1. The weighted sum is divided by B * C, as in ``an``.
    """
    y, _, unknown = _check(logits, targets)
    num_classes = logits.shape[1]
    w = 1.0 / max(num_classes - 1, 1)
    loss = _bce_matrix(logits, y)
    return torch.where(unknown, w * loss, loss).mean()


_COUNTS = ("unknown", "all")


def _check_count(count: str) -> None:
    if count not in _COUNTS:
        raise ValueError(f"unknown count {count!r}; valid: {list(_COUNTS)}")


def large_loss_count(rate: float, n_unknown: int, n_entries: int, count: str = "unknown") -> int:
    """How many unknown entries the large-loss methods modify in a batch of ``n_entries`` entries.

    ``count="unknown"`` (the default): ``ceil(rate * n_unknown)``, the fraction ``rate`` of the unknown entries
    that Kim et al. describe. ``count="all"``: ``ceil(rate * n_entries)`` (``n_entries = B * C``), capped at
    ``n_unknown``, as the official LargeLossMatters code counts (``losses.py``:
    ``k = ceil(batch_size * num_classes * (1 - clean_rate))``). That code was written for single positive
    labels, where ``n_unknown = B * C - B``: there the two counts differ by at most ``ceil(rate * B)``
    entries. With partial labels of known proportion p, ``n_unknown`` is about ``(1 - p) * B * C`` and
    ``"all"`` modifies a fraction ``rate / (1 - p)`` of the unknown entries: at p = 0.5 twice the intended one.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must lie in [0, 1], got {rate}")
    _check_count(count)
    base = n_unknown if count == "unknown" else n_entries
    # The small slack keeps ceil(0.3 * 10) at 3 despite floating-point error.
    return min(n_unknown, math.ceil(rate * base - 1e-9))


def _largest_unknown(loss: Tensor, unknown: Tensor, rate: float, count: str = "unknown") -> Tensor:
    """Mask of the :func:`large_loss_count` unknown entries with the largest (detached) loss."""
    k = large_loss_count(rate, int(unknown.sum()), unknown.numel(), count)
    mask = torch.zeros_like(unknown)
    if k <= 0:
        return mask
    scores = torch.where(unknown, loss.detach(), -math.inf).flatten()
    mask.view(-1)[torch.topk(scores, k).indices] = True
    return mask


def ll_r_loss(logits: Tensor, targets: Tensor, rate: float, count: str = "unknown") -> Tensor:
    """Large-loss rejection (LL-R, Kim et al., CVPR 2022) on the AN loss.

    Among the unknown entries (assumed negative), the ``ceil(rate * n_unknown)`` with the largest
    loss in the batch are likely false negatives: they get weight 0 (and zero gradient). The
    sum is divided by all B * C entries, as in the official code (rejected entries included).
    ``count="all"`` counts as the official code does, ``ceil(rate * B * C)`` (see :func:`large_loss_count`).
    """
    y, _, unknown = _check(logits, targets)
    loss = _bce_matrix(logits, y)
    rejected = _largest_unknown(loss, unknown, rate, count)
    return torch.where(rejected, 0.0, loss).sum() / loss.numel()


def ll_ct_loss(logits: Tensor, targets: Tensor, rate: float, count: str = "unknown") -> Tensor:
    """Large-loss temporary correction (LL-Ct, Kim et al., CVPR 2022) on the AN loss.

    As ``ll_r`` (``count`` included), but the selected unknown entries are treated as positives for this
    batch only (the stored labels never change). Averaged over all B * C entries.
    """
    y, _, unknown = _check(logits, targets)
    flipped = _largest_unknown(_bce_matrix(logits, y), unknown, rate, count)
    return _bce_matrix(logits, torch.where(flipped, 1.0, y)).mean()


def large_loss_rate(epoch: int, delta_rel: float, max_rate: float = 1.0) -> float:
    """The large-loss schedule: ``min(delta_rel * (epoch - 1), max_rate)`` for a 1-based epoch.

    As Kim et al. (and LargeLossMatters), epoch t modifies ``(t - 1) * Δrel`` of the unknown
    losses, so epoch 1 is plain AN (an epoch below 1 is treated as 1). Here ``delta_rel`` is a
    fraction, not a percent: the paper's ``Δrel = 0.2`` (percent per epoch) is ``delta_rel = 0.002``.
    """
    return min(max(delta_rel * (epoch - 1), 0.0), max_rate)


class PartialLoss(nn.Module):
    """Base of the loss modules: holds the current epoch and calls a functional loss."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        """Record the (1-based) epoch; losses without a schedule ignore it."""
        self.epoch = int(epoch)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class KnownBCELoss(PartialLoss):
    """``bce``: BCE over the known entries (see :func:`bce_loss`)."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return bce_loss(logits, targets)


class PartialBCELoss(PartialLoss):
    """``partial_bce``: Durand et al.'s normalised BCE (see :func:`partial_bce_loss`)."""

    def __init__(self, alpha: float = -4.45, beta: float = 5.45) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return partial_bce_loss(logits, targets, self.alpha, self.beta)


class AsymmetricLoss(PartialLoss):
    """``asl``: asymmetric loss over the known entries (see :func:`asl_loss`)."""

    def __init__(self, gamma_neg: float = 2.0, gamma_pos: float = 1.0, margin: float = 0.05, eps: float = 1e-8,
                 reduction: str = "sum"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; valid: {list(_REDUCTIONS)}")
        self.gamma_neg, self.gamma_pos, self.margin, self.eps = gamma_neg, gamma_pos, margin, eps
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return asl_loss(logits, targets, self.gamma_neg, self.gamma_pos, self.margin, self.eps, self.reduction)


class AssumeNegativeLoss(PartialLoss):
    """``an``: unknown entries taken as negatives (see :func:`an_loss`)."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return an_loss(logits, targets)


class WeakAssumeNegativeLoss(PartialLoss):
    """``wan``: AN with unknown terms down-weighted by ``1 / (C - 1)`` (see :func:`wan_loss`)."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return wan_loss(logits, targets)


class _LargeLoss(PartialLoss):
    """Shared schedule of the large-loss modules: ``rate = min(delta_rel * (epoch - 1), max_rate)``, 1-based.

    ``count`` says what ``rate`` is a fraction of: ``"unknown"`` (default) the batch's unknown entries,
    ``"all"`` all its B * C entries as the official code (see :func:`large_loss_count`).
    """

    def __init__(self, delta_rel: float = 0.002, max_rate: float = 1.0, count: str = "unknown") -> None:
        super().__init__()
        if delta_rel < 0 or not 0.0 <= max_rate <= 1.0:
            raise ValueError(f"need delta_rel >= 0 and 0 <= max_rate <= 1; got {delta_rel}, {max_rate}")
        _check_count(count)
        self.delta_rel, self.max_rate, self.count = delta_rel, max_rate, count

    @property
    def rate(self) -> float:
        """Fraction of the batch's unknown entries (or of all entries, ``count="all"``) modified now."""
        return large_loss_rate(self.epoch, self.delta_rel, self.max_rate)


class LargeLossRejection(_LargeLoss):
    """``ll_r``: reject the largest unknown-entry losses (see :func:`ll_r_loss`)."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return ll_r_loss(logits, targets, self.rate, self.count)


class LargeLossCorrection(_LargeLoss):
    """``ll_ct``: flip the largest unknown-entry losses to positives (see :func:`ll_ct_loss`)."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return ll_ct_loss(logits, targets, self.rate, self.count)


class LabelCompletion(nn.Module):
    """Confidence-aware label completion: the extra term added to a base loss after a warm-up.

    Epochs 1 .. ``warmup_epochs`` (1-based, as the training loops count) are left alone; from
    epoch ``warmup_epochs + 1`` on, unknown entries whose detached probability exceeds ``t_pos``
    are taken as positives and those below ``t_neg`` as negatives. The term is ``weight * sum over completed entries of
    BCE / (B * C)``: it grows with the number of confident entries instead of giving one
    confident entry the weight of a whole batch. The probabilities choose entries only; the
    targets are hard 0/1, made soft by ``weight``.
    """

    def __init__(self, warmup_epochs: int = 5, t_pos: float = 0.95, t_neg: float = 0.05, weight: float = 0.5):
        super().__init__()
        if not 0.0 <= t_neg < t_pos <= 1.0 or weight < 0 or warmup_epochs < 0:
            raise ValueError(
                f"need 0 <= t_neg < t_pos <= 1, weight >= 0, warmup_epochs >= 0; "
                f"got t_neg={t_neg}, t_pos={t_pos}, weight={weight}, warmup_epochs={warmup_epochs}"
            )
        self.warmup_epochs, self.t_pos, self.t_neg, self.weight = warmup_epochs, t_pos, t_neg, weight
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        """Record the (1-based) epoch that decides whether the warm-up is over."""
        self.epoch = int(epoch)

    @property
    def active(self) -> bool:
        """Whether the warm-up is over: the epoch is past ``warmup_epochs``."""
        return self.epoch > self.warmup_epochs

    def completed_targets(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Return (mask of completed unknown entries, their 0/1 targets) from detached probabilities."""
        _, _, unknown = _check(logits, targets)
        prob = torch.sigmoid(logits.detach())
        pos = unknown & (prob > self.t_pos)
        neg = unknown & (prob < self.t_neg)
        return pos | neg, pos.to(logits.dtype)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if not self.active or self.weight == 0:
            return _zero(logits)
        mask, y = self.completed_targets(logits, targets)
        return self.weight * torch.where(mask, _bce_matrix(logits, y), 0.0).sum() / logits.numel()


class WithLabelCompletion(PartialLoss):
    """A base loss plus the :class:`LabelCompletion` term; ``set_epoch`` reaches both."""

    def __init__(self, base: PartialLoss, completion: LabelCompletion) -> None:
        super().__init__()
        self.base, self.completion = base, completion

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.base.set_epoch(epoch)
        self.completion.set_epoch(epoch)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.base(logits, targets) + self.completion(logits, targets)


class WeightedLoss(PartialLoss):
    """``weight`` times a loss (DualCoOp's ``loss_w``); ``set_epoch`` reaches the loss."""

    def __init__(self, base: PartialLoss, weight: float) -> None:
        super().__init__()
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        self.base, self.weight = base, float(weight)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.base.set_epoch(epoch)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.weight * self.base(logits, targets)


LOSSES: dict[str, type[PartialLoss]] = {
    "bce": KnownBCELoss,
    "partial_bce": PartialBCELoss,
    "asl": AsymmetricLoss,
    "an": AssumeNegativeLoss,
    "wan": WeakAssumeNegativeLoss,
    "ll_r": LargeLossRejection,
    "ll_ct": LargeLossCorrection,
}


def _instantiate(cls: type[nn.Module], what: str, params: dict[str, Any]) -> Any:
    """Build ``cls(**params)``, turning an unexpected keyword into a ValueError that lists the valid ones."""
    valid = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {what}; valid: {valid}")
    return cls(**params)


def build_loss(name: str, completion: dict[str, Any] | None = None, weight: float = 1.0,
               **params: Any) -> PartialLoss:
    """Build the loss registered as ``name`` (one of :data:`LOSSES`) with keyword ``params``.

    ``completion``, when given, holds the :class:`LabelCompletion` keywords and wraps the loss
    with the completion term. ``weight`` (> 0) multiplies the whole loss, the completion term
    included: ``weight * (base + completion)``, as DualCoOp's ``loss_w``; with the default 1 the
    loss is returned unwrapped. An unknown name or parameter raises ``ValueError`` listing the
    valid choices, so a typo in a config fails at start-up rather than being ignored.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {sorted(LOSSES)}")
    loss = _instantiate(LOSSES[name], f"loss {name!r}", params)
    if completion is not None:
        loss = WithLabelCompletion(loss, _instantiate(LabelCompletion, "label completion", dict(completion)))
    return loss if weight == 1.0 else WeightedLoss(loss, weight)
