"""One factory for every architecture: named JSON configs -> ``ModelConfig`` -> ``SARLModel``.

Architectures live as JSON files in ``configs/`` (``tiny``, ``rn50``, ``rn101``, ``vitb16`` ...); users add their
own with ``add_model_config``. A JSON file holds only the fields it changes; everything else takes the
``ModelConfig`` default, and ``create_model(name, categories, **overrides)`` overrides any field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .config import ConfigError, field, from_dict, non_negative, positive, to_dict
from .decoupling import INITS as DECOUPLING_INITS

_CONFIG_DIR = Path(__file__).parent / "configs"
_REGISTRY: dict[str, dict[str, Any]] = {}

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


def _load_builtin_configs() -> None:
    for path in sorted(_CONFIG_DIR.glob("*.json")):
        _REGISTRY[path.stem] = json.loads(path.read_text())


def add_model_config(path_or_dict: str | Path | dict[str, Any], name: str | None = None) -> str:
    """Register an architecture from a JSON file (named after its stem), a folder of them, or a dict.

    Returns the registered name (the last one for a folder).
    """
    if isinstance(path_or_dict, dict):
        if not name:
            raise ValueError("add_model_config(dict) needs a name")
        resolve_model_config_dict(path_or_dict, prefix=name)  # validate now, not at first use
        _REGISTRY[name] = dict(path_or_dict)
        return name
    path = Path(path_or_dict)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no model config JSON at {path}")
    for file in files:
        cfg = json.loads(file.read_text())
        resolve_model_config_dict(cfg, prefix=file.stem)
        _REGISTRY[name if name and len(files) == 1 else file.stem] = cfg
    return name if name and len(files) == 1 else files[-1].stem


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return sorted(_REGISTRY)


def resolve_model_config_dict(data: dict[str, Any], prefix: str = "model") -> ModelConfig:
    return from_dict(ModelConfig, data, prefix=prefix)


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The resolved ``ModelConfig`` of architecture ``name`` with ``overrides`` applied (validated)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return resolve_model_config_dict({**_REGISTRY[name], **overrides}, prefix=f"model {name}")


def create_model(name: str | ModelConfig, categories: Any = None, *, num_classes: int | None = None,
                 word_vectors: Any = None, **overrides: Any):
    """Build a SARL model (or a baseline, by ``head``) for ``categories``.

    Args:
        name: a registered architecture name (``list_models()``) or a ``ModelConfig``.
        categories: a list of category names or a ``Vocabulary``.
        num_classes: instead of categories, ``num_classes`` placeholder names ``class_0`` ...
        word_vectors: a loaded gensim ``KeyedVectors`` (else ``word_vectors`` from the config is loaded).
        **overrides: any ``ModelConfig`` field.

    Returns a ``SARLModel``; ``model(images)`` gives logits of shape (B, C).

    Example:
        >>> from sarl.model import create_model
        >>> model = create_model("tiny", ["circle", "square"])
        >>> model(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 2])
    """
    from .sarl import SARLModel
    from .vocabulary import Vocabulary

    cfg = name if isinstance(name, ModelConfig) else get_model_config(name, **overrides)
    if isinstance(name, ModelConfig) and overrides:
        cfg = resolve_model_config_dict({**to_dict(name), **overrides})
    if categories is None:
        if num_classes is None:
            raise ValueError("create_model needs categories (names or a Vocabulary) or num_classes")
        categories = [f"class_{i}" for i in range(num_classes)]
    vocabulary = categories if isinstance(categories, Vocabulary) else Vocabulary.from_names(list(categories))
    return SARLModel(cfg, vocabulary, word_vectors=word_vectors)


_load_builtin_configs()
