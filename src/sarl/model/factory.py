"""One factory for every architecture: named JSON configs -> ``ModelConfig`` -> ``SARLModel``.

Architectures live as JSON files in ``configs/`` (``tiny``, ``rn50``, ``rn101``, ``vitb16`` ...); users add their
own with ``add_model_config``. A JSON file holds only the fields it changes; everything else takes the
``ModelConfig`` default, and ``create_model(name, categories, **overrides)`` overrides any field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ConfigError, from_dict, to_dict
from .model_config import ModelConfig
from .sarl import SARLModel
from .vocabulary import Vocabulary

_CONFIG_DIR = Path(__file__).parent / "configs"
_REGISTRY: dict[str, dict[str, Any]] = {}


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
        >>> import torch
        >>> from sarl.model import create_model
        >>> model = create_model("tiny", ["circle", "square"])
        >>> model(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 2])
    """
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
