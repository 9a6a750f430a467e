"""Semantic decoupling: a semantic-guided spatial attention that splits dense features per category (SARL.md 3).

For location features f_i (in CLIP space) and a category's semantic vector w_c:
    bilinear: h_ci = tanh((U f_i) * (V w_c))     score_ci = p . h_ci      (low-rank bilinear pooling, SSGRL)
    additive: h_ci = tanh(U f_i + V w_c)         score_ci = p . h_ci
    dot:      score_ci = (U f_i) . (V w_c) / sqrt(r)
    a_ci = softmax_i(score_ci / T);  f_c = sum_i a_ci f_i  (stays in CLIP space, so it compares with text features)

Initialisation (``init``). ``linear``: ``nn.Linear``'s default for U, V and p. Its scores are a product of three
small factors (about 1e-3 with unit word vectors), so the attention starts as mean pooling to 3 decimals and its
gradients start as small. ``unit``: the score path sees unit vectors f_i / |f_i| (the pooled values stay f_i), U
and V start N(0, 1) so every component of U f_i and V w_c has unit variance, whatever the tower's feature scale,
and p starts N(0, 1/r): scores of order 1 from the first step (docs/results/attention-entropy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INITS = ("linear", "unit")


class SemanticDecoupling(nn.Module):
    """(B, HW, D) dense features x (C, S) semantic vectors -> (B, C, D) category features (and attention maps)."""

    def __init__(self, feature_dim: int, semantic_dim: int, rank: int = 512, fusion: str = "bilinear",
                 temperature: float = 1.0, init: str = "linear"):
        super().__init__()
        if fusion not in ("bilinear", "additive", "dot"):
            raise ValueError(f"fusion {fusion!r} is not one of bilinear, additive, dot")
        if init not in INITS:
            raise ValueError(f"init {init!r} is not one of {', '.join(INITS)}")
        self.fusion, self.temperature, self.rank, self.init = fusion, temperature, rank, init
        self.visual_proj = nn.Linear(feature_dim, rank, bias=False)  # U
        self.semantic_proj = nn.Linear(semantic_dim, rank, bias=False)  # V
        self.score = nn.Linear(rank, 1, bias=False) if fusion != "dot" else None  # p
        if init == "unit":
            nn.init.normal_(self.visual_proj.weight)
            nn.init.normal_(self.semantic_proj.weight)
            if self.score is not None:
                nn.init.normal_(self.score.weight, std=rank**-0.5)

    def attention(self, features: torch.Tensor, semantics: torch.Tensor) -> torch.Tensor:
        """Attention weights a (B, C, HW), each row summing to 1 over locations."""
        if self.init == "unit":
            features, semantics = F.normalize(features, dim=-1), F.normalize(semantics, dim=-1)
        u = self.visual_proj(features)  # (B, HW, r)
        v = self.semantic_proj(semantics.to(u.dtype))  # (C, r)
        if self.fusion == "dot":
            scores = torch.einsum("bir,cr->bci", u, v) / math.sqrt(self.rank)
        else:
            joint = u[:, None] * v[None, :, None] if self.fusion == "bilinear" else u[:, None] + v[None, :, None]
            scores = self.score(torch.tanh(joint)).squeeze(-1)  # (B, C, HW)
        return torch.softmax(scores / self.temperature, dim=-1)

    def forward(self, features: torch.Tensor, semantics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.attention(features, semantics)
        return torch.bmm(attn, features.to(attn.dtype)), attn
