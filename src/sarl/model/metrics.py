"""Multi-label metrics with unknown labels: per-class AP, mAP and CP/CR/CF1/OP/OR/OF1, on torchmetrics.

Conventions (the same in the functional core and in :class:`MultiLabelMetrics`):

- ``targets`` is (N, C) with 1 = present, 0 = absent and ``ignore_index`` (-1) = unknown;
  unknown entries are left out of every count, as if the (image, class) pair was not seen.
- ``scores`` are any scores that rank (logits, or probabilities); AP only uses their order, and F1 compares them
  with a threshold on the same scale. :class:`MultiLabelMetrics` keeps the logits: fp32 sigmoids are exactly
  1.0 above a logit of about 16.6, so ranking probabilities ties confident positives with confident negatives
  (a head that scales cosines by 100 saturates routinely); F1 at probability threshold t compares the logits with
  logit(t), which selects the same entries.
- Every number is a percentage (0-100), as papers report them.
- AP is the non-interpolated AP of scikit-learn's ``average_precision_score`` (VOC07 after
  2010, COCO multi-label papers): the mean over positives of the precision at their rank; tied
  scores are one threshold, so a positive tied with negatives shares their precision. A class
  without a known positive has AP NaN and is left out of mAP (``nanmean``).
- F1 follows the ML-GCN evaluation code that multi-label papers share: per class
  ``CP = mean_c TP_c / pred_c``, ``CR = mean_c TP_c / pos_c``, ``CF1 = 2 CP CR / (CP + CR)``
  (the harmonic mean of the averages), and ``O*`` the same from counts summed over classes.
  A class never predicted has precision 0 (torchmetrics' ``zero_division=0``); a class without
  a known positive has no recall and, as in mAP, is left out of the CR average. A score
  is a predicted positive when it is ``>= threshold``; with ``top_k`` it must also be among the
  image's ``top_k`` scores (ML-GCN's "top-3"; pass ``threshold=0`` for pure top-k).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["MultiLabelMetrics", "average_precision_per_class", "f1_scores", "mean_average_precision"]


def _check(scores: Tensor, targets: Tensor) -> None:
    if scores.dim() != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must both be (N, C); got {tuple(scores.shape)}, {tuple(targets.shape)}")


def average_precision_per_class(scores: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """AP of each class in percent, over the entries whose target is known; NaN for a class without positives.

    Vectorised: one sort per column, then cumulative counts. Positives in a group of tied
    scores all take the precision at the end of the group, which is scikit-learn's semantics.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.9, 0.2], [0.8, 0.7], [0.3, 0.6], [0.1, 0.4]])
        >>> targets = torch.tensor([[1, 0], [0, 1], [1, -1], [-1, 0]])
        >>> average_precision_per_class(scores, targets)  # (1 + 2/3) / 2 and 1/1
        tensor([ 83.3333, 100.0000])
    """
    _check(scores, targets)
    n, c = scores.shape
    if n == 0:
        return torch.full((c,), float("nan"), device=scores.device)
    # Work on (C, N) rows: sorting and scanning contiguous memory is about twice as fast.
    s, order = torch.sort(scores.T.contiguous(), dim=1, descending=True)
    t = torch.gather(targets.T.contiguous(), 1, order)
    known = t != ignore_index
    pos = (t == 1) & known
    tp = torch.cumsum(pos, 1, dtype=torch.float64)
    seen = torch.cumsum(known, 1, dtype=torch.float64)
    # Index of the last entry of each run of equal scores: mark run ends, then a reversed cummin.
    is_end = torch.ones_like(known)
    is_end[:, :-1] = s[:, :-1] != s[:, 1:]
    idx = torch.arange(n, device=scores.device).expand(c, n)
    end = torch.where(is_end, idx, n).flip(1).cummin(1).values.flip(1)
    precision = torch.gather(tp, 1, end) / torch.gather(seen, 1, end).clamp(min=1)
    n_pos = pos.sum(1)
    ap = torch.where(pos, precision, 0.0).sum(1) / n_pos.clamp(min=1)
    ap = torch.where(n_pos > 0, ap, float("nan"))
    return (100.0 * ap).float()


def mean_average_precision(scores: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """mAP in percent: the mean of :func:`average_precision_per_class` over classes with a known positive.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.9, 0.2], [0.8, 0.7], [0.3, 0.6], [0.1, 0.4]])
        >>> targets = torch.tensor([[1, 0], [0, 1], [1, -1], [-1, 0]])
        >>> mean_average_precision(scores, targets)
        tensor(91.6667)
    """
    return torch.nanmean(average_precision_per_class(scores, targets, ignore_index))


def _logit(p: float) -> float:
    """logit(p) for a probability threshold: -inf at 0 (every score passes), +inf at 1 (none does but +inf)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {p}")
    return float(torch.logit(torch.tensor(p, dtype=torch.float64)))


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den`` is 0."""
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))


def f1_scores(
    scores: Tensor, targets: Tensor, threshold: float = 0.5, top_k: int | None = None, ignore_index: int = -1
) -> dict[str, Tensor]:
    """CP, CR, CF1, OP, OR, OF1 in percent over the known entries (see the module docstring for the rules).

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.9, 0.6, 0.1], [0.2, 0.7, 0.8]])
        >>> targets = torch.tensor([[1, 0, 0], [1, -1, 1]])
        >>> {k: round(v.item(), 2) for k, v in f1_scores(scores, targets).items()}
        {'CP': 66.67, 'CR': 75.0, 'CF1': 70.59, 'OP': 66.67, 'OR': 66.67, 'OF1': 66.67}
    """
    _check(scores, targets)
    pred = scores >= threshold
    if top_k is not None:
        k = min(top_k, scores.shape[1])
        in_top = torch.zeros_like(pred)
        in_top.scatter_(1, scores.topk(k, dim=1).indices, True)
        pred &= in_top
    known = targets != ignore_index
    pred = pred & known
    gt = (targets == 1) & known
    tp = (pred & gt).sum(0).double()
    n_pred, n_gt = pred.sum(0).double(), gt.sum(0).double()
    cp = _ratio(tp, n_pred).mean()
    cr = _ratio(_ratio(tp, n_gt).sum(), (n_gt > 0).sum().double())
    op, orr = _ratio(tp.sum(), n_pred.sum()), _ratio(tp.sum(), n_gt.sum())
    out = {"CP": cp, "CR": cr, "CF1": _ratio(2 * cp * cr, cp + cr), "OP": op, "OR": orr}
    out["OF1"] = _ratio(2 * op * orr, op + orr)
    return {k: (100.0 * v).float() for k, v in out.items()}


class MultiLabelMetrics(Metric):
    """All multi-label metrics of the spec at once, synced across data-parallel workers.

    ``update`` stores the logits (or, with ``from_logits=False``, probabilities) and targets (list states reduced
    by ``cat``); AP ranks what was stored, and F1 at probability ``threshold`` compares logits with
    ``logit(threshold)``. ``compute`` returns percentages: ``mAP``, ``AP`` (a (C,) tensor), ``CP``, ``CR``,
    ``CF1``, ``OP``, ``OR``, ``OF1`` at ``threshold``, and ``CF1_top3`` / ``OF1_top3`` (named after the default
    ``top_k = 3``; they use ``top_k``) with the same threshold. Every value is a tensor.

    Example:
        >>> import torch
        >>> metric = MultiLabelMetrics(num_classes=2)
        >>> metric.update(torch.tensor([[2.0, -1.0], [1.0, 0.5]]), torch.tensor([[1, 0], [0, 1]]))
        >>> metric.update(torch.tensor([[-0.5, 0.3], [-2.0, -0.2]]), torch.tensor([[1, -1], [-1, 0]]))
        >>> out = metric.compute()
        >>> round(out["mAP"].item(), 2), out["AP"]
        (91.67, tensor([ 83.3333, 100.0000]))
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, num_classes: int, from_logits: bool = True, threshold: float = 0.5, top_k: int = 3, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.from_logits, self.threshold, self.top_k = num_classes, from_logits, threshold, top_k
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, targets: Tensor) -> None:
        """Add a batch: ``preds`` (B, C) logits (or probabilities if ``from_logits=False``), ``targets`` (B, C)."""
        _check(preds, targets)
        if preds.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes, got {preds.shape[1]}")
        self.scores.append(preds.detach().float())
        self.targets.append(targets.detach().long())

    def compute(self) -> dict[str, Tensor]:
        """All metrics over the stored (and, in data-parallel runs, gathered) entries, in percent."""
        scores, targets = dim_zero_cat(self.scores), dim_zero_cat(self.targets)
        ap = average_precision_per_class(scores, targets)
        out: dict[str, Tensor] = {"mAP": torch.nanmean(ap), "AP": ap}
        threshold = _logit(self.threshold) if self.from_logits else self.threshold
        out.update(f1_scores(scores, targets, threshold))
        top = f1_scores(scores, targets, threshold, top_k=self.top_k)
        out["CF1_top3"], out["OF1_top3"] = top["CF1"], top["OF1"]
        return out
