"""Checkpoints: one directory with the resolved model config, the vocabulary and the weights.

    <dir>/model.json        ModelConfig as JSON (plus the format version)
    <dir>/vocabulary.json   the Vocabulary the model was trained on
    <dir>/weights.pt        the state dict, read back with ``torch.load(weights_only=True)``
    <dir>/train_state.pt    optional: optimizer / scheduler / scaler / RNG state and epoch, for resuming

Nothing in a checkpoint is unpickled as an arbitrary object: JSON for structure, tensors-only ``torch.load`` for
weights, so a checkpoint from an untrusted store cannot run code. The semantic vectors are a buffer in the state
dict, so loading never needs the word-vector file again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .config import from_dict
from .factory import ModelConfig
from .sarl import SARLModel
from .vocabulary import Vocabulary

FORMAT_VERSION = 1
MODEL_FILE, VOCAB_FILE, WEIGHTS_FILE, TRAIN_STATE_FILE = "model.json", "vocabulary.json", "weights.pt", "train_state.pt"


def save_checkpoint(model: SARLModel, directory: str | Path, train_state: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and optionally a resumable ``train_state`` of tensors and plain data) to ``directory``."""
    model = _unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(model.config), "extra": extra or {}}
    (directory / MODEL_FILE).write_text(json.dumps(meta, indent=2))
    (directory / VOCAB_FILE).write_text(json.dumps(model.vocabulary.to_dict(), indent=2))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    if train_state is not None:
        torch.save(train_state, directory / TRAIN_STATE_FILE)
    return directory


def read_checkpoint_meta(directory: str | Path) -> tuple[ModelConfig, Vocabulary, dict[str, Any]]:
    """The model config, vocabulary and extra metadata of a checkpoint, without loading weights."""
    directory = Path(directory)
    if not (directory / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a SARL checkpoint (no {MODEL_FILE})")
    meta = json.loads((directory / MODEL_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}")
    config = from_dict(ModelConfig, meta["config"], prefix="checkpoint.config")
    vocabulary = Vocabulary.from_dict(json.loads((directory / VOCAB_FILE).read_text()), source=str(directory))
    return config, vocabulary, meta.get("extra", {})


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> SARLModel:
    """Rebuild the model of a checkpoint and load its weights (strict: every tensor must match)."""
    directory = Path(directory)
    config, vocabulary, _ = read_checkpoint_meta(directory)
    state = torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    # Weights come from the checkpoint, so the towers are built without fetching pretrained weights.
    model = SARLModel(config, vocabulary, semantics=state.get("semantics"), load_pretrained=False)
    model.load_state_dict(state, strict=True)
    return model


def load_train_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The resumable training state saved beside the weights, or None."""
    path = Path(directory) / TRAIN_STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
