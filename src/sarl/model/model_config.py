"""``ModelConfig``: everything that defines a SARL model's architecture, and the choices its fields allow.

Its own module so that the model (``sarl.py``), the checkpoints and the factory all import it without a cycle.
"""

from __future__ import annotations

import dataclasses

from .config import field, non_negative, positive
from .decoupling import INITS as DECOUPLING_INITS

HEADS = ("sarl", "global", "dualcoop")
FUSIONS = ("bilinear", "additive", "dot")
PROMPT_MODES = ("class_specific", "shared", "handcrafted")
UNFREEZE = ("none", "last_block", "visual", "all")


@dataclasses.dataclass
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
    image_size: int = field(224, check=positive())
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    head: str = field("sarl", choices=HEADS)
    # Semantic decoupling (SARL.md step 3).
    fusion: str = field("bilinear", choices=FUSIONS)
    rank: int = field(512, check=positive())
    temperature: float = field(1.0, check=positive())
    # Initialisation of U, V and p (decoupling.py): linear (nn.Linear's) or unit (unit-scale scores from step 0).
    decoupling_init: str = field("linear", choices=DECOUPLING_INITS)
    # Category-specific prompts (step 4).
    prompt_mode: str = field("class_specific", choices=PROMPT_MODES)
    n_ctx: int = field(16, check=positive())
    ctx_init: str | None = "a photo of a"  # null: N(0, 0.02) initialisation
    negative_prompts: bool = False
    # Weight alpha of the global term alpha * s * cos(g, t_c); 0 disables it (step 5 option).
    global_weight: float = field(0.0, check=non_negative())
    # s of the score s * cos: fixed (CoOp keeps CLIP's scale frozen, DualCoOp fixes it) unless learn_scale, which
    # learns it in log space from this value; learnt by SGD with the rest it collapses (heads.py).
    logit_scale: float = field(20.0, check=positive())
    learn_scale: bool = False
    # Category semantics (step 2): word vectors ("word", needs word_vectors) or CLIP text embeddings ("clip").
    semantic_source: str = field("word", choices=("word", "clip"))
    word_vectors: str | None = None
    semantic_fallback: str = field("error", choices=("error", "clip"))
    # Remove the component all categories share (CLIP texts of "a photo of a ..." are highly similar, and so are
    # word vectors of one domain): the attention then keys on what tells categories apart.
    center_semantics: bool = True
    # Which encoder parameters train: none (paper default), the last visual block, the whole visual tower, all.
    unfreeze: str = field("none", choices=UNFREEZE)
    description: str = ""
