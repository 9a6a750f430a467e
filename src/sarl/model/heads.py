"""Scoring heads over visual and text features (SARL.md step 5 and the baselines).

- ``sarl``: logit_c = s * cos(f_c, t_c) + b_c, or s * (cos(f_c, t_c+) - cos(f_c, t_c-)) + b_c with negative
  prompts, plus the optional global term alpha * s * cos(g, t_c+).
- ``global``: the CLIP baseline, s * cos(g, t_c) + b_c.
- ``dualcoop``: DualCoOp's class-specific region aggregation (``models/dualcoop.py``, ``DualCoop.forward``) over
  the regions i of ``dense`` (its mean token and every location):
  logit_c = 5 * sum_i w_ci * (s * cos(f_i, t_c+) - s * cos(f_i, t_c-)),  w_ci = softmax_i(s * cos(f_i, t_c+)),
  with s = 20 fixed (``logit_scale``, not learnt), DualCoOp's fixed factor 5 and no bias. DualCoOp trains a
  two-way softmax over its (negative, positive) logits, which is sigmoid(positive - negative): this logit.

Cosines (and everything after them) are computed in float32 even under autocast: in bf16, s * cos would be
quantised to about 0.01-0.02 logit steps, which creates ties in ranking metrics.

The scale s is fixed by default (``learn_scale=False``), as CoOp keeps CLIP's logit scale frozen and DualCoOp
fixes it. Learnt (in log space) with the other parameters by SGD, it collapses: with CLIP's cosines (about 0.2)
every initial logit is about +4, the gradient into log s sums over every known entry of the batch (about 210 at
B = 32, C = 80, 10% known, against 0.7 per bias), s falls towards 0 and takes with it every gradient it multiplies
(into the prompts and the decoupling). ``tests/unit/model/test_logit_scale.py`` shows it on CLIP-like features.
``log_scale`` is kept as a parameter either way (frozen when fixed), so checkpoints of both kinds load alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DUALCOOP_FACTOR = 5.0  # DualCoOp multiplies the aggregated region logits by 5 (``output = 5 * (output * w).sum(-1)``)


def _cos(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine of (B, D) or (B, N, D) features against every row of (C, D) text features -> (B, C) / (B, N, C)."""
    return F.normalize(x.float(), dim=-1) @ F.normalize(text.float(), dim=-1).t()


def _cos_paired(category_feat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine of each category feature f_c (B, C, D) with its own t_c (C, D) -> (B, C)."""
    return (F.normalize(category_feat.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)


class ScoreHead(nn.Module):
    """The scoring of one head kind: scale s (fixed, or with ``learn_scale`` learnt in log space) and learnt bias
    b_c for ``sarl`` and ``global``; a fixed scale and no bias for ``dualcoop`` (``log_scale`` and ``bias`` are None
    there)."""

    def __init__(self, kind: str, num_classes: int, logit_scale: float = 20.0, global_weight: float = 0.0,
                 learn_scale: bool = False):
        super().__init__()
        self.kind = kind
        self.global_weight = global_weight
        self.fixed_scale = float(logit_scale)
        if kind == "dualcoop":
            self.register_parameter("log_scale", None)
            self.register_parameter("bias", None)
        else:
            self.log_scale = nn.Parameter(torch.tensor(math.log(logit_scale)), requires_grad=learn_scale)
            self.bias = nn.Parameter(torch.zeros(num_classes))

    @property
    def scale(self) -> torch.Tensor | float:
        """s: ``exp(log_scale)`` (frozen unless ``learn_scale``) or, for ``dualcoop``, the fixed ``logit_scale``."""
        return self.fixed_scale if self.log_scale is None else self.log_scale.exp()

    def forward(self, text_pos: torch.Tensor, text_neg: torch.Tensor | None, global_feat: torch.Tensor,
                category_feat: torch.Tensor | None = None, dense: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits (B, C); ``bias`` replaces the learnt b_c (serving a vocabulary other than the trained one)."""
        with torch.autocast(global_feat.device.type, enabled=False):
            s = self.scale
            s = s.float() if isinstance(s, torch.Tensor) else s
            if self.kind == "global":
                logits = s * _cos(global_feat, text_pos)
            elif self.kind == "sarl":
                logits = s * _cos_paired(category_feat, text_pos)
                if text_neg is not None:
                    logits = logits - s * _cos_paired(category_feat, text_neg)
                if self.global_weight:
                    logits = logits + self.global_weight * s * _cos(global_feat, text_pos)
            else:  # dualcoop
                pos = s * _cos(dense, text_pos)  # (B, N, C) region logits of the positive prompts
                region = pos - s * _cos(dense, text_neg) if text_neg is not None else pos
                logits = DUALCOOP_FACTOR * (torch.softmax(pos, dim=1) * region).sum(dim=1)
            bias = self.bias if bias is None else bias
            return logits if bias is None else logits + bias.float()
