"""Scoring heads over visual and text features (SARL.md step 5 and the baselines).

- ``sarl``: logit_c = s * cos(f_c, t_c) + b_c, or s * (cos(f_c, t_c+) - cos(f_c, t_c-)) with negative prompts,
  plus the optional global term alpha * s * cos(g, t_c).
- ``global``: the CLIP baseline, s * cos(g, t_c) + b_c.
- ``dualcoop``: region logits s * cos(f_i, t_c+/-) aggregated by a spatial softmax over locations, pos - neg.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _cos(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine of (B, D) or (B, N, D) features against every row of (C, D) text features -> (B, C) / (B, N, C)."""
    return F.normalize(x, dim=-1) @ F.normalize(text, dim=-1).to(x.dtype).t()


def _cos_paired(category_feat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine of each category feature f_c (B, C, D) with its own t_c (C, D) -> (B, C)."""
    return (F.normalize(category_feat, dim=-1) * F.normalize(text, dim=-1).to(category_feat.dtype)).sum(-1)


class ScoreHead(nn.Module):
    """Learnt scale s (in log space) and per-category bias b_c shared by the three heads."""

    def __init__(self, kind: str, num_classes: int, logit_scale: float = 20.0, global_weight: float = 0.0):
        super().__init__()
        self.kind = kind
        self.global_weight = global_weight
        self.log_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, text_pos: torch.Tensor, text_neg: torch.Tensor | None, global_feat: torch.Tensor,
                category_feat: torch.Tensor | None = None, dense: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, C); ``bias`` replaces the learnt b_c (serving a vocabulary other than the trained one)."""
        s = self.log_scale.exp()
        if self.kind == "global":
            logits = s * _cos(global_feat, text_pos)
        elif self.kind == "sarl":
            logits = s * _cos_paired(category_feat, text_pos)
            if text_neg is not None:
                logits = logits - s * _cos_paired(category_feat, text_neg)
            if self.global_weight:
                logits = logits + self.global_weight * s * _cos(global_feat, text_pos)
        else:  # dualcoop
            logits = self._spatial(s * _cos(dense, text_pos))
            if text_neg is not None:
                logits = logits - self._spatial(s * _cos(dense, text_neg))
        return logits + (self.bias if bias is None else bias).to(logits.dtype)

    @staticmethod
    def _spatial(region: torch.Tensor) -> torch.Tensor:
        """(B, HW, C) region logits -> (B, C): softmax over locations weights each location's logit."""
        return (torch.softmax(region, dim=1) * region).sum(dim=1)
