"""``SARLModel``: CLIP towers + semantic decoupling + category prompts + a scoring head.

The three heads share every part, so SARL and its baselines differ only in ``ModelConfig.head``:
``sarl`` (decoupled category features vs category prompts), ``global`` (CLIP's global embedding vs prompts)
and ``dualcoop`` (DualCoOp: region logits against positive/negative prompts over the locations and the mean
token, aggregated by the positive side's spatial softmax).

``forward(images)`` is ``forward_features(*encode_image(images))``: the split lets a feature cache (frozen
backbone) feed ``forward_features`` directly. Text features do not depend on the image, so outside training
they are computed once and cached until the weights or the categories change.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .backbone import VisualEncoder, build_clip, resolve_quick_gelu
from .decoupling import SemanticDecoupling
from .heads import ScoreHead
from .model_config import ModelConfig
from .prompts import PromptLearner, TextEncoder
from .vocabulary import Vocabulary, load_word_vectors, semantic_vectors


class SARLModel(nn.Module):
    """Multi-label classifier over ``vocabulary.names``; ``forward(images)`` -> logits (B, C)."""

    def __init__(self, config: ModelConfig, vocabulary: Vocabulary, word_vectors: Any = None,
                 semantics: torch.Tensor | None = None, load_pretrained: bool = True):
        super().__init__()
        # The activation is resolved once and kept in the config: a checkpoint rebuilds the same network.
        config = dataclasses.replace(config, quick_gelu=resolve_quick_gelu(config.clip, config.pretrained,
                                                                          config.quick_gelu))
        self.config = config
        self.vocabulary = vocabulary
        clip = build_clip(config.clip, config.pretrained if load_pretrained else None, config.quick_gelu)
        # DualCoOp keeps the mean token as one more region (HW + 1 dense tokens); the other heads use locations only.
        self.visual = VisualEncoder(clip.visual, mean_token=config.head == "dualcoop")
        self.text = TextEncoder(clip)
        for p in self.parameters():
            p.requires_grad_(False)
        names = vocabulary.names
        negative = config.negative_prompts or config.head == "dualcoop"
        self.prompts = PromptLearner(self.text, names, config.prompt_mode, config.n_ctx, config.ctx_init, negative)
        self.head = ScoreHead(config.head, len(names), config.logit_scale, config.global_weight, config.learn_scale)
        self.decoupling: SemanticDecoupling | None = None
        if config.head == "sarl":
            mean = torch.zeros(semantics.shape[1]) if semantics is not None else None
            if semantics is None:
                semantics, mean = self._semantic_vectors(word_vectors)
            self.register_buffer("semantics", semantics.float())
            # Kept so that categories added later (zero-shot) are centred exactly like the trained ones.
            self.register_buffer("semantic_mean", mean.float())
            self.decoupling = SemanticDecoupling(self.visual.output_dim, semantics.shape[1], config.rank,
                                                 config.fusion, config.temperature, config.decoupling_init)
        self._unfreeze(config.unfreeze)
        self.cache_text = True
        self._text_cache: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # ---------------------------------------------------------------- construction helpers
    def _semantic_vectors(self, word_vectors: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit semantic vectors w_c and the mean removed from them (see ``ModelConfig.center_semantics``)."""
        cfg = self.config
        if word_vectors is None and cfg.semantic_source == "word":
            if not cfg.word_vectors:
                raise ValueError("semantic_source 'word' needs word_vectors (a gensim KeyedVectors or a file path); "
                                 "or set semantic_source=clip to use CLIP text embeddings")
            word_vectors = cfg.word_vectors
        if isinstance(word_vectors, str):
            word_vectors = load_word_vectors(word_vectors)
        vectors = semantic_vectors(self.vocabulary, word_vectors, text_encoder=self.text.encode_texts,
                                   fallback=cfg.semantic_fallback, source=cfg.semantic_source)
        mean = torch.zeros(vectors.shape[1])
        if cfg.center_semantics and len(vectors) > 1:
            mean = vectors.mean(dim=0)
            vectors = torch.nn.functional.normalize(vectors - mean, dim=-1)
        return vectors, mean

    def _unfreeze(self, which: str) -> None:
        modules: list[nn.Module] = []
        if which == "last_block":
            modules = self.visual.last_block()
        elif which == "visual":
            modules = [self.visual]
        elif which == "all":
            modules = [self.visual, self.text]
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(True)

    @property
    def visual_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.visual.parameters())

    def train(self, mode: bool = True) -> SARLModel:
        """Only modules with trainable parameters train: frozen parts of the towers stay in eval mode.

        A module of a tower trains when any parameter in it requires grad, so with ``unfreeze: last_block`` the
        last ResNet block (and its BatchNorms) trains while the BatchNorms of the frozen blocks keep their
        running statistics and normalise with them, as DualCoOp keeps its frozen CLIP in eval mode.
        """
        super().train(mode)
        for tower in (self.visual, self.text):
            for module in tower.modules():
                module.training = mode and any(p.requires_grad for p in module.parameters())
        if mode:
            self._text_cache = None
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._text_cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---------------------------------------------------------------- forward
    @property
    def num_classes(self) -> int:
        return len(self.vocabulary)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (B, HW, D) and global (B, D) features; no autograd graph when the visual tower is frozen."""
        if self.visual_frozen:
            with torch.no_grad():
                return self.visual(images)
        return self.visual(images)

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt features (t_c+, t_c- or None); cached unless they train (they do not depend on the image)."""
        cacheable = self.cache_text and (not self.training or not self.prompts.trainable)
        if cacheable and self._text_cache is not None:
            return self._text_cache
        feats = self.prompts()
        if cacheable:
            self._text_cache = tuple(f.detach() if f is not None else None for f in feats)  # type: ignore[assignment]
        return feats

    def forward_features(self, dense: torch.Tensor, global_feat: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from visual features (as given by ``encode_image`` or a feature cache)."""
        text_pos, text_neg = self.text_features()
        category_feat = None
        if self.decoupling is not None:
            category_feat, _ = self.decoupling(dense, self.semantics)
        return self.head(text_pos, text_neg, global_feat, category_feat=category_feat, dense=dense)

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor]) -> torch.Tensor:
        """Logits (B, C) from images (B, 3, H, W), or from cached ``(dense, global)`` features.

        One entry point for both keeps the engine, DDP (which passes a tuple argument through) and checkpoints
        unchanged when a trial trains from a feature cache (``sarl.model.features``).
        """
        if isinstance(inputs, (tuple, list)):
            return self.forward_features(*inputs)
        return self.forward_features(*self.encode_image(inputs))

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Per-category spatial attention (B, C, HW) of the semantic decoupling, for inspection and plots."""
        if self.decoupling is None:
            raise ValueError(f"head {self.config.head!r} has no semantic decoupling")
        dense, _ = self.encode_image(images)
        return self.decoupling.attention(dense, self.semantics)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
