"""Semantic decoupling: a semantic-guided spatial attention that splits dense features per category (SARL.md 3).

For location features f_i (in CLIP space) and a category's semantic vector w_c:
    bilinear: h_ci = tanh((U f_i) * (V w_c))     score_ci = p . h_ci      (low-rank bilinear pooling, SSGRL)
    additive: h_ci = tanh(U f_i + V w_c)         score_ci = p . h_ci
    dot:      score_ci = (U f_i) . (V w_c) / sqrt(r)
    a_ci = softmax_i(score_ci / T);  f_c = sum_i a_ci f_i  (stays in CLIP space, so it compares with text features)
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SemanticDecoupling(nn.Module):
    """(B, HW, D) dense features x (C, S) semantic vectors -> (B, C, D) category features (and attention maps)."""

    def __init__(self, feature_dim: int, semantic_dim: int, rank: int = 512, fusion: str = "bilinear",
                 temperature: float = 1.0):
        super().__init__()
        if fusion not in ("bilinear", "additive", "dot"):
            raise ValueError(f"fusion {fusion!r} is not one of bilinear, additive, dot")
        self.fusion, self.temperature, self.rank = fusion, temperature, rank
        self.visual_proj = nn.Linear(feature_dim, rank, bias=False)  # U
        self.semantic_proj = nn.Linear(semantic_dim, rank, bias=False)  # V
        self.score = nn.Linear(rank, 1, bias=False) if fusion != "dot" else None  # p

    def attention(self, features: torch.Tensor, semantics: torch.Tensor) -> torch.Tensor:
        """Attention weights a (B, C, HW), each row summing to 1 over locations."""
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
