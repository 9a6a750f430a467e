"""The SARL model library: pure PyTorch (torch, open_clip, torchmetrics, gensim); never Ray or boto3.

Public entry point::

    from sarl.model import create_model
    model = create_model("tiny", ["cat", "dog"])   # or a Vocabulary; any ModelConfig field as a keyword
    logits = model(images)                         # (B, C)
"""

from .config import ConfigError
from .factory import add_model_config, create_model, get_model_config, list_models
from .model_config import ModelConfig
from .sarl import SARLModel
from .vocabulary import Category, Vocabulary, load_word_vectors, semantic_vectors

__all__ = [
    "Category",
    "ConfigError",
    "ModelConfig",
    "SARLModel",
    "Vocabulary",
    "add_model_config",
    "create_model",
    "get_model_config",
    "list_models",
    "load_word_vectors",
    "semantic_vectors",
]
