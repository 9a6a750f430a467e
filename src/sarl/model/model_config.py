"""``ModelConfig``: everything that defines a SARL model's architecture, and the choices its fields allow.

Its own module so that the model (``sarl.py``), the checkpoints and the factory all import it without a cycle.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .config import section
from .decoupling import INITS as DECOUPLING_INITS

HEADS = ("sarl", "global", "dualcoop")
FUSIONS = ("bilinear", "additive", "dot")
PROMPT_MODES = ("class_specific", "shared", "handcrafted")
UNFREEZE = ("none", "last_block", "visual", "all")


@section
class ModelConfig:
    """Everything that defines a SARL model's architecture; saved in every checkpoint.

    Fields marked *option* in SARL.md are here so that sweeps can vary them.
    """

    # open_clip tower pair: a registered open_clip name ("RN50", "ViT-B-16") or an inline CLIP config dict.
    clip: str | dict = "RN50"
    # Weights for the CLIP towers: an open_clip tag ("openai", "laion2b_s34b_b79k"), a local file, or null (random).
    pretrained: str | None = None
    # Activation of the towers: true = QuickGELU (OpenAI CLIP weights), false = GELU, null = decide from the
    # weights source when the model is built (``backbone.resolve_quick_gelu``: a tag's own activation; a local
    # file of an architecture with an ``openai`` tag is taken for those weights). A built model and its
    # checkpoint hold the resolved value, so a reload runs the same network.
    quick_gelu: bool | None = None
    # Input resolution. The towers keep their native positional embeddings; they are interpolated at run time,
    # so 448 px works with weights trained at 224 px (the paper's RN101 setting).
    image_size: int = Field(224, gt=0)
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    head: Literal[HEADS] = "sarl"
    # Semantic decoupling (SARL.md step 3).
    fusion: Literal[FUSIONS] = "bilinear"
    rank: int = Field(512, gt=0)
    temperature: float = Field(1.0, gt=0)
    # Initialisation of U, V and p (decoupling.py): linear (nn.Linear's) or unit (unit-scale scores from step 0).
    decoupling_init: Literal[DECOUPLING_INITS] = "linear"
    # Category-specific prompts (step 4).
    prompt_mode: Literal[PROMPT_MODES] = "class_specific"
    n_ctx: int = Field(16, gt=0)
    ctx_init: str | None = "a photo of a"  # null: N(0, 0.02) initialisation
    negative_prompts: bool = False
    # Weight alpha of the global term alpha * s * cos(g, t_c); 0 disables it (step 5 option).
    global_weight: float = Field(0.0, ge=0)
    # s of the score s * cos: fixed (CoOp keeps CLIP's scale frozen, DualCoOp fixes it) unless learn_scale, which
    # learns it in log space from this value; learnt by SGD with the rest it collapses (heads.py).
    logit_scale: float = Field(20.0, gt=0)
    learn_scale: bool = False
    # Category semantics (step 2): word vectors ("word", needs word_vectors) or CLIP text embeddings ("clip").
    semantic_source: Literal["word", "clip"] = "word"
    word_vectors: str | None = None
    semantic_fallback: Literal["error", "clip"] = "error"
    # Remove the component all categories share (CLIP texts of "a photo of a ..." are highly similar, and so are
    # word vectors of one domain): the attention then keys on what tells categories apart.
    center_semantics: bool = True
    # Which encoder parameters train: none (paper default), the last visual block, the whole visual tower, all.
    unfreeze: Literal[UNFREEZE] = "none"
    description: str = ""
