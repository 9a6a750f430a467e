"""Category prompts through the frozen CLIP text encoder (SARL.md step 4).

``PromptLearner`` places M learnable context vectors in front of each category's name tokens
(``[SOT] ctx_1 ... ctx_M name . [EOT]``) and runs the result through CLIP's text transformer:
- ``class_specific``: one context per category (SARL), ``shared``: one context for all (CoOp),
  ``handcrafted``: no learnt context, the fixed prompt ``"a photo of a {name}."``.
- ``negative_prompts``: a second context set gives DualCoOp's negative prompt t_c-.

The text transformer is causal and pools at the EOT token, so tokens after the longest EOT never influence the
result; sequences are cut there (exact, and 3-4x less work than CLIP's 77 positions).
"""

from __future__ import annotations

import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import text_global_pool
from torch import nn

_TOKENIZER: SimpleTokenizer | None = None
HANDCRAFTED = "a photo of a {name}."


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """CLIP BPE tokens (bundled vocabulary, no download)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = SimpleTokenizer(context_length=context_length)
    return _TOKENIZER(texts, context_length=context_length)


class TextEncoder(nn.Module):
    """CLIP's text transformer over token *embeddings*, so learnt context vectors can be fed in."""

    def __init__(self, clip: CLIP):
        super().__init__()
        self.transformer = clip.transformer
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.pool_type = clip.text_pool_type
        self.eos_id = getattr(clip, "text_eos_id", None)
        self.context_length = clip.context_length
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)

    def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L, width) embeddings, their (N, L) tokens -> (N, D) text features (unnormalised)."""
        length = int(tokens.argmax(dim=-1).max()) + 1 if self.pool_type == "argmax" else tokens.shape[1]
        x = embeddings[:, :length] + self.positional_embedding[:length].to(embeddings.dtype)
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        x = text_global_pool(x, tokens[:, :length], self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection if self.text_projection is not None else x

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Features of plain sentences (handcrafted prompts, CLIP-text semantics)."""
        device = self.token_embedding.weight.device
        tokens = tokenize(texts, self.context_length).to(device)
        return self.forward(self.embed(tokens), tokens)


class PromptLearner(nn.Module):
    """Learnt prompt context per category; ``forward()`` returns text features t_c (C, D) (and t_c- if negative)."""

    def __init__(self, text: TextEncoder, names: list[str], mode: str = "class_specific", n_ctx: int = 16,
                 ctx_init: str | None = "a photo of a", negative: bool = False):
        super().__init__()
        self.text = text
        self.mode = mode
        self.n_ctx = 0 if mode == "handcrafted" else n_ctx
        self.negative = negative
        if mode == "handcrafted":
            self.ctx = self.neg_ctx = None
        else:
            shape = (len(names), n_ctx, text.width) if mode == "class_specific" else (n_ctx, text.width)
            self.ctx = nn.Parameter(self._init_ctx(shape, ctx_init))
            # Initialised like the positive context (its own random draw), as DualCoOp initialises both prompts
            # the same way: both random, or both from the given words.
            self.neg_ctx = nn.Parameter(self._init_ctx(shape, ctx_init)) if negative else None
        self.set_names(names)

    def _init_ctx(self, shape: tuple[int, ...], ctx_init: str | None) -> torch.Tensor:
        """N(0, 0.02), with the last words replaced by the embedded ``ctx_init`` phrase when given.

        With M = number of words of ``ctx_init`` (CoOp's choice) the prompt starts as exactly those words, so t_c
        equals CLIP's text feature of ``"{ctx_init} {name}."``; with a larger M (the default M = 16 with
        "a photo of a") the first M - words vectors are random and the phrase sits right before the name.
        """
        ctx = torch.randn(shape) * 0.02
        if ctx_init:
            tokens = tokenize([ctx_init], self.text.context_length)
            n_words = int(tokens.argmax(dim=-1)) - 1
            n_words = min(n_words, shape[-2])
            with torch.no_grad():
                emb = self.text.embed(tokens.to(self.text.token_embedding.weight.device))[0, 1:1 + n_words].cpu()
            ctx[..., shape[-2] - n_words:, :] = emb
        return ctx

    def set_names(self, names: list[str]) -> None:
        """(Re)tokenise category names: ``X``-placeholders for the context, then the name."""
        self.names = list(names)
        if self.mode == "handcrafted":
            texts = [HANDCRAFTED.format(name=n) for n in names]
        else:
            texts = self._context_texts(names)
        tokens = tokenize(texts, self.text.context_length)
        self.register_buffer("tokens", tokens.to(self.text.token_embedding.weight.device), persistent=False)

    def _context_texts(self, names: list[str]) -> list[str]:
        """``X``-placeholders where the context vectors go, then the name."""
        return [" ".join(["X"] * self.n_ctx) + f" {n}." for n in names]

    def _features(self, ctx: torch.Tensor | None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.tokens if tokens is None else tokens
        emb = self.text.embed(tokens)
        if ctx is not None:
            if ctx.dim() == 2:
                ctx = ctx.unsqueeze(0).expand(emb.shape[0], -1, -1)
            emb = torch.cat([emb[:, :1], ctx.to(emb.dtype), emb[:, 1 + self.n_ctx:]], dim=1)
        return self.text(emb, tokens)

    def encode_new_names(self, names: list[str], negative: bool = False) -> torch.Tensor:
        """Text features (N, D) of names the prompts were not trained on, through the learnt context: the shared
        context, or the mean of the class-specific ones (the context of an average category). With ``negative``,
        the negative context: the "absent" side of a DualCoOp-style pair for a zero-shot category."""
        ctx = self.neg_ctx if negative else self.ctx
        if ctx is None:
            raise ValueError(f"no learnt {'negative ' if negative else ''}context (prompt mode {self.mode!r})")
        ctx = ctx.mean(dim=0) if ctx.dim() == 3 else ctx
        tokens = tokenize(self._context_texts(names), self.text.context_length)
        return self._features(ctx, tokens.to(self.text.token_embedding.weight.device))

    @property
    def trainable(self) -> bool:
        """Whether the prompt features depend on a trained parameter (the context, or the text tower)."""
        return any(p.requires_grad for p in self.parameters())

    def forward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.ctx is None:  # handcrafted: a graph only when the text tower trains (unfreeze: all)
            if self.trainable:
                return self._features(None), None
            with torch.no_grad():
                return self._features(None), None
        pos = self._features(self.ctx)
        neg = self._features(self.neg_ctx) if self.neg_ctx is not None else None
        return pos, neg
