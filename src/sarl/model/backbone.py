"""CLIP towers from open_clip: construction, pretrained weights, and dense + global visual features.

Dense features are what SARL decouples per category, so they must live in CLIP's joint embedding space:
- ResNet towers: the layer4 map, each location sent through the attention pool's value and output projections
  (positional embedding interpolated to the map size); the attention pool itself gives the global embedding.
- ViT towers: every output token through ``ln_post`` and ``proj``; patch tokens are dense, the class token global.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally or downloaded."""


def build_clip(clip: str | dict, pretrained: str | None = None, quick_gelu: bool | None = None) -> CLIP:
    """Build an open_clip ``CLIP`` from a registered name or an inline config dict, then load ``pretrained``.

    ``pretrained`` is an open_clip tag (downloaded through open_clip's cache; fails offline with a message
    naming the alternatives), a local weights file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``), or None.
    The activation of the towers (QuickGELU or GELU) is ``resolve_quick_gelu(clip, pretrained, quick_gelu)``.
    """
    name = clip if isinstance(clip, str) else "<inline>"
    cfg = _architecture(clip)
    if "hf_model_name" in cfg.get("text_cfg", {}) or "timm_model_name" in cfg.get("vision_cfg", {}):
        raise ValueError(f"{name}: only open_clip's built-in CLIP towers are supported (no HF/timm towers)")
    cfg.pop("custom_text", None)
    cfg["quick_gelu"] = resolve_quick_gelu(clip, pretrained, quick_gelu)
    weights = _resolve_pretrained(name, pretrained) if pretrained is not None else None
    model = CLIP(**cfg)
    if weights is not None:
        open_clip.load_checkpoint(model, weights, strict=True, weights_only=True)
    return model


def _architecture(clip: str | dict) -> dict:
    cfg = open_clip.get_model_config(clip) if isinstance(clip, str) else dict(clip)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {clip!r}; see open_clip.list_models()")
    return dict(cfg)


def resolve_quick_gelu(clip: str | dict, pretrained: str | None = None, quick_gelu: bool | None = None) -> bool:
    """Whether the towers of ``clip`` with weights ``pretrained`` use QuickGELU (else GELU).

    An explicit ``quick_gelu`` (True/False) always wins. Otherwise: an architecture config that says QuickGELU
    (``RN50-quickgelu`` ...) uses it; an open_clip tag uses its pretrained config's activation (OpenAI weights:
    QuickGELU); any other source (a local weights file, or an ``s3://`` URI a platform resolves) is assumed to
    hold the architecture's **OpenAI** weights when the architecture has an ``openai`` tag, so it gets that
    tag's activation (QuickGELU for RN50, RN101, ViT-B-16 ...): give ``quick_gelu=False`` for a local copy of
    GELU weights (LAION, DataComp ...). Random towers (``pretrained=None``) and architectures without an
    ``openai`` tag use GELU. The decision reads no file, so a checkpoint records it and rebuilds the same one.
    """
    if quick_gelu is not None:
        return bool(quick_gelu)
    if _architecture(clip).get("quick_gelu"):
        return True
    if pretrained is None or not isinstance(clip, str):
        return False
    tags = open_clip.list_pretrained_tags_by_model(clip)
    tag = pretrained if pretrained in tags else ("openai" if "openai" in tags else None)
    return bool(tag and open_clip.get_pretrained_cfg(clip, tag).get("quick_gelu", False))


def _resolve_pretrained(name: str, pretrained: str) -> str:
    """A local file path for ``pretrained`` (a local file as it is, an open_clip tag through its cache)."""
    expanded = os.path.expanduser(pretrained)
    if os.path.isfile(expanded):
        return expanded
    tags = open_clip.list_pretrained_tags_by_model(name) if name != "<inline>" else []
    pcfg = open_clip.get_pretrained_cfg(name, pretrained) if name != "<inline>" else {}
    if not pcfg:
        raise PretrainedUnavailableError(
            f"pretrained={pretrained!r} is neither a local file nor an open_clip tag of {name}; "
            f"tags: {', '.join(tags) or 'none'}; or give a local weights file path (or null for random weights)")
    try:
        path = open_clip.download_pretrained(pcfg)
    except Exception as exc:  # network errors come in many types (OSError, HF hub errors, URLError ...)
        raise PretrainedUnavailableError(
            f"could not fetch open_clip weights {name}/{pretrained} ({type(exc).__name__}: {exc}). Offline, use "
            f"a local weights file (pretrained=/path/to/{name}.pt, e.g. copied from a machine with access or "
            f"from s3:// through the platform), another tag ({', '.join(tags)}), or pretrained=null "
            f"for random weights") from exc
    if not path or not Path(path).is_file():
        raise PretrainedUnavailableError(f"open_clip returned no file for {name}/{pretrained}")
    return path


def _interpolate_grid(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a (N, D) grid of positional embeddings (square, N = n*n) to ``grid`` with bicubic interpolation."""
    n = int(math.isqrt(pos.shape[0]))
    if (n, n) == grid:
        return pos
    d = pos.shape[1]
    resized = F.interpolate(pos.reshape(1, n, n, d).permute(0, 3, 1, 2).float(), size=grid, mode="bicubic",
                            align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], d).to(pos.dtype)


class VisualEncoder(nn.Module):
    """Dense (B, HW, D) and global (B, D) features of a CLIP visual tower, both in the joint embedding space.

    With ``mean_token`` the dense features are (B, 1 + HW, D): one more region first, as DualCoOp's modified
    attention pool returns it (``clip/model.py``, ``AttentionConv``: HW + 1 tokens, value and output projected).
    ResNet: the mean of the layer4 locations plus its positional embedding, value and output projected like every
    location. ViT: the class token, through ``ln_post`` and ``proj`` like the patch tokens (the global embedding).
    """

    def __init__(self, visual: nn.Module, mean_token: bool = False):
        super().__init__()
        if not isinstance(visual, (ModifiedResNet, VisionTransformer)):
            raise TypeError(f"unsupported visual tower {type(visual).__name__}")
        self.visual = visual
        self.kind = "resnet" if isinstance(visual, ModifiedResNet) else "vit"
        self.mean_token = bool(mean_token)

    @property
    def output_dim(self) -> int:
        if self.kind == "resnet":
            return self.visual.attnpool.c_proj.out_features
        return self.visual.proj.shape[1]

    def last_block(self) -> list[nn.Module]:
        """Modules trained by ``unfreeze: last_block``."""
        if self.kind == "resnet":
            return [self.visual.layer4[-1], self.visual.attnpool]
        return [self.visual.transformer.resblocks[-1], self.visual.ln_post, _ParamHolder(self.visual, "proj")]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "resnet":
            return self._resnet(images)
        return self._vit(images)

    def _resnet(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual
        x = v.stem(images.to(v.conv1.weight.dtype))
        x = v.layer4(v.layer3(v.layer2(v.layer1(x))))
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).permute(2, 0, 1)  # (HW, B, C)
        pool = v.attnpool
        pos = pool.positional_embedding
        pos = torch.cat([pos[:1], _interpolate_grid(pos[1:], (h, w))], dim=0).to(x.dtype)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pos[:, None, :]  # (1+HW, B, C)
        # Global: the attention pool exactly as CLIP runs it, with the interpolated positional embedding.
        g, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=c, num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=self.training,
            need_weights=False)
        # Dense: value then output projection at every location (attention to itself only), as in DualCoOp;
        # with ``mean_token`` the mean token too, first.
        dense = pool.c_proj(pool.v_proj(x if self.mean_token else x[1:]))  # ([1+]HW, B, D)
        return dense.permute(1, 0, 2), g[0]

    def _vit(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual
        if v.attn_pool is not None or getattr(v, "final_ln_after_pool", False) or v.pool_type != "tok":
            raise ValueError("dense ViT features need a class-token ViT without attention pooling")
        x = v.conv1(images.to(v.conv1.weight.dtype))  # (B, width, gh, gw)
        b, width, gh, gw = x.shape
        x = x.reshape(b, width, gh * gw).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).expand(b, 1, width)
        pos = v.positional_embedding
        pos = torch.cat([pos[:1], _interpolate_grid(pos[1:], (gh, gw))], dim=0).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + pos
        x = v.ln_pre(v.patch_dropout(x))
        x = v.ln_post(v.transformer(x))
        x = x @ v.proj  # every token projected as the class token is
        return (x if self.mean_token else x[:, 1:]), x[:, 0]


class _ParamHolder(nn.Module):
    """Lets a bare ``nn.Parameter`` attribute (ViT ``proj``) be (un)frozen like a module."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        object.__setattr__(self, "_param", getattr(owner, name))

    def parameters(self, recurse: bool = True):
        yield self._param
