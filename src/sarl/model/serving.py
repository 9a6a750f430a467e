"""Serving a trained model under a vocabulary other than the one it was trained on.

A served vocabulary renames categories, adds aliases, changes thresholds, switches categories off and adds
categories the checkpoint never saw (zero-shot). :func:`bind_vocabulary` turns it into a :class:`BoundVocabulary`:
everything per-category the scoring needs, computed once per vocabulary version, so a request only pays for its
image (``score``).

Each served category is matched to a trained one when its name or one of its aliases is a trained name or alias
(case-insensitive), so ``{"name": "canine", "aliases": ["dog"]}`` keeps the trained ``dog`` row. A matched
category keeps its learnt prompt features t_c, its semantic vector w_c and its bias b_c. A category with no
match is zero-shot:

- prompt: CLIP text of its handcrafted prompt (``prompt``, default ``"a photo of a {name}."``), no learnt context;
- negative prompt (``dualcoop``, and ``sarl`` with ``negative_prompts``): the learnt negative context (the mean of
  the class-specific ones) in front of its name. Leaving the negative side out would score s * cos+ alone, about
  +20 logits with CLIP's cosines of about 0.2: p close to 1 on every image;
- semantic vector: its explicit ``vector``, else word vectors or CLIP text as the model was trained
  (``ModelConfig.semantic_source``), centred with the training mean (``SARLModel.semantic_mean``) and
  normalised exactly as the trained vectors were;
- bias: the mean of the trained biases (the prior of an average category); zero for a head without bias
  (``dualcoop``).

With the checkpoint's own vocabulary, ``score`` equals ``model(images).sigmoid()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .sarl import SARLModel
from .vocabulary import (
    Category,
    MissingWordsError,
    Vocabulary,
    is_builtin_word_vectors,
    load_word_vectors,
    semantic_vectors,
)

__all__ = ["BoundVocabulary", "bind_vocabulary", "default_word_vectors", "match_trained", "vocabulary_problems"]

PROMPT_CHUNK = 256  # zero-shot prompts per text-tower forward when a vocabulary is bound


@dataclass(frozen=True)
class BoundVocabulary:
    """A vocabulary version bound to a model: per-category tensors in the served order (C served categories)."""

    vocabulary: Vocabulary
    trained_index: tuple[int | None, ...]  # row of the trained model per served category; None: zero-shot
    text_pos: torch.Tensor  # (C, D)
    text_neg: torch.Tensor | None  # (C, D); zero-shot rows from the learnt negative context
    semantics: torch.Tensor | None  # (C, S), only for the sarl head
    bias: torch.Tensor  # (C,)

    @property
    def version(self) -> str:
        return self.vocabulary.version

    @property
    def zero_shot(self) -> list[bool]:
        return [i is None for i in self.trained_index]

    @torch.no_grad()
    def score(self, model: SARLModel, images: torch.Tensor, autocast: bool | None = None) -> torch.Tensor:
        """Probabilities (B, C) for a batch of preprocessed images, one forward of the visual tower.

        ``autocast`` (default: on for CUDA images): the visual tower runs under bf16 autocast; its features are
        cast back to fp32, so the attention, the cosine similarities and the sigmoid are computed in fp32.
        """
        enabled = images.is_cuda if autocast is None else autocast
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=enabled):
            dense, global_feat = model.encode_image(images)
        dense, global_feat = dense.float(), global_feat.float()
        category_feat = None
        if model.decoupling is not None:
            category_feat, _ = model.decoupling(dense, self.semantics.to(dense.device))
        logits = model.head(self.text_pos.to(dense.device),
                            self.text_neg.to(dense.device) if self.text_neg is not None else None,
                            global_feat, category_feat=category_feat, dense=dense, bias=self.bias.to(dense.device))
        return logits.float().sigmoid()

    def score_list(self, model: SARLModel, images: list[torch.Tensor], device: torch.device) -> list[list[float]]:
        """``score`` of preprocessed (3, H, W) CPU images, as lists of floats: the stack, the copy to ``device`` and
        the copy back included, so a caller on an event loop runs this whole call in a worker thread."""
        batch = torch.stack(images)
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        return self.score(model, batch).cpu().tolist()


def _keys(category: Category) -> list[str]:
    return [t.strip().casefold() for t in (category.name, *category.aliases)]


def match_trained(vocabulary: Vocabulary, trained: Vocabulary) -> tuple[list[int | None], list[str]]:
    """Trained row of each served category (None: zero-shot) and the problems of the matching.

    A served category may match at most one trained category, and a trained category may back at most one served
    category (otherwise two names would silently share one learnt prompt).
    """
    owner = {key: i for i, c in enumerate(trained.categories) for key in _keys(c)}
    rows: list[int | None] = []
    problems: list[str] = []
    used: dict[int, str] = {}
    for c in vocabulary.categories:
        hits = sorted({owner[k] for k in _keys(c) if k in owner})
        if len(hits) > 1:
            names = ", ".join(repr(trained.categories[i].name) for i in hits)
            problems.append(f"{c.name!r} matches several trained categories ({names}) through its name and aliases")
            hits = hits[:1]
        row = hits[0] if hits else None
        if row is not None and row in used:
            problems.append(f"{c.name!r} and {used[row]!r} both match the trained category "
                            f"{trained.categories[row].name!r}; keep one and make the other an alias")
        if row is not None:
            used.setdefault(row, c.name)
        rows.append(row)
    return rows, problems


def default_word_vectors(recorded: str | None, given: Any = None) -> Any:
    """The word vectors that embed new category names: ``given`` (loaded vectors) if any, else the ones the model
    was trained with when they are built in (``glove-6b-50d``: the same on every machine); None otherwise, as a
    recorded file path may not exist where the checkpoint is served."""
    if given is not None:
        return given
    if isinstance(recorded, str) and is_builtin_word_vectors(recorded):
        return load_word_vectors(recorded)
    return None


def _zero_shot_semantics(model: SARLModel, categories: list[Category], word_vectors: Any) -> torch.Tensor:
    """Centred unit semantic vectors (N, S) for zero-shot categories, built as the trained ones were."""
    cfg = model.config
    if cfg.semantic_source == "word":
        word_vectors = default_word_vectors(cfg.word_vectors, word_vectors)
    needs_words = cfg.semantic_source == "word" and any(c.vector is None for c in categories)
    if needs_words and word_vectors is None:
        names = ", ".join(repr(c.name) for c in categories if c.vector is None)
        raise ValueError(f"zero-shot categories {names} need word vectors (the model's semantic vectors are word "
                         "vectors, not built-in ones): give the word vector file, or an explicit 'vector' per "
                         "category")
    raw = semantic_vectors(Vocabulary(categories, version="zero-shot"), word_vectors,
                           text_encoder=model.text.encode_texts, source=cfg.semantic_source)
    expected = model.semantics.shape[1]
    if raw.shape[1] != expected:
        raise ValueError(f"zero-shot semantic vectors have {raw.shape[1]} dimensions; the model's have {expected}")
    return F.normalize(raw - model.semantic_mean.to(raw), dim=-1)


def _chunked(encode: Any, texts: list[str]) -> torch.Tensor:
    return torch.cat([encode(texts[i:i + PROMPT_CHUNK]) for i in range(0, len(texts), PROMPT_CHUNK)])


@torch.no_grad()
def bind_vocabulary(model: SARLModel, vocabulary: Vocabulary, word_vectors: Any = None) -> BoundVocabulary:
    """Compute the per-category tensors of ``vocabulary`` for ``model`` (in eval mode; not on the request path).

    Raises:
        ValueError: the vocabulary cannot be served by this model (the message lists why).
    """
    rows, problems = match_trained(vocabulary, model.vocabulary)
    if problems:
        raise ValueError("vocabulary cannot be served by this model:\n" + "\n".join(f"  - {p}" for p in problems))
    model.eval()
    trained_pos, trained_neg = model.text_features()
    device = trained_pos.device
    zero = [i for i, r in enumerate(rows) if r is None]
    zero_cats = [vocabulary.categories[i] for i in zero]
    handcrafted = negative = None
    if zero:  # in chunks: thousands of zero-shot prompts in one text forward would be one huge activation
        prompts = [c.prompt_text() for c in zero_cats]
        handcrafted = _chunked(model.text.encode_texts, prompts)
        if trained_neg is not None:
            negative = _chunked(lambda names: model.prompts.encode_new_names(names, negative=True),
                                [c.name for c in zero_cats])

    def gather(trained: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
        out = torch.zeros(len(rows), *trained.shape[1:], dtype=trained.dtype, device=device)
        known = [i for i, r in enumerate(rows) if r is not None]
        if known:
            out[known] = trained[[rows[i] for i in known]]
        if zero and fill is not None:
            out[zero] = fill.to(out)
        return out

    # A head without a learnt bias (dualcoop) scores with zero bias, zero-shot categories included.
    bias = model.head.bias.detach() if model.head.bias is not None else torch.zeros(len(trained_pos), device=device)
    semantics = None
    if model.decoupling is not None:
        fill = _zero_shot_semantics(model, zero_cats, word_vectors) if zero else None
        semantics = gather(model.semantics, fill)
    return BoundVocabulary(
        vocabulary=vocabulary,
        trained_index=tuple(rows),
        text_pos=gather(trained_pos.detach(), handcrafted),
        text_neg=gather(trained_neg.detach(), negative) if trained_neg is not None else None,
        semantics=semantics,
        bias=gather(bias, bias.mean().expand(len(zero)) if zero else None),
    )


def vocabulary_problems(vocabulary: Vocabulary, checkpoint_dir: str | Path, word_vectors: Any = None) -> list[str]:
    """Why ``vocabulary`` could not be served with the checkpoint in ``checkpoint_dir``; empty when it can.

    Checked without building the model: matching to trained categories, explicit vector dimensions against the
    model's semantic dimension, and (word-vector models) every word of every zero-shot category being found.
    """
    from .checkpoint import WEIGHTS_FILE, read_checkpoint_meta

    config, trained, _ = read_checkpoint_meta(checkpoint_dir)
    rows, problems = match_trained(vocabulary, trained)
    zero = [c for c, r in zip(vocabulary.categories, rows) if r is None]
    if config.head != "sarl" or not zero:
        return problems
    state = torch.load(Path(checkpoint_dir) / WEIGHTS_FILE, map_location="cpu", weights_only=True, mmap=True)
    dim = state["semantics"].shape[1]
    for c in zero:
        if c.vector is not None and len(c.vector) != dim:
            problems.append(f"{c.name!r}: vector has {len(c.vector)} dimensions; the model's semantic vectors "
                            f"have {dim}")
    if config.semantic_source == "word":
        lookup = [c for c in zero if c.vector is None]
        word_vectors = default_word_vectors(config.word_vectors, word_vectors) if lookup else word_vectors
        if lookup and word_vectors is None:
            problems.append(f"cannot check the words of zero-shot categories {', '.join(repr(c.name) for c in lookup)}"
                            ": the model uses word vectors; give the word vector file")
        elif lookup and word_vectors.vector_size != dim:
            problems.append(f"the word vectors have {word_vectors.vector_size} dimensions; the model's semantic "
                            f"vectors have {dim}")
        elif lookup:
            try:
                semantic_vectors(Vocabulary(lookup, version="check"), word_vectors, source="word")
            except MissingWordsError as e:
                problems += [f"{name!r}: words not in the word vectors: {', '.join(words)}"
                             for name, words in e.missing.items()]
            except ValueError as e:
                problems.append(str(e))
    return problems
