"""Checkpoints: one directory with the resolved model config, the vocabulary, the trained weights and the identity
of the frozen backbone.

    <dir>/model.json        format version, the resolved ModelConfig (``quick_gelu`` included), the backbone's
                            identity (``clip``, ``pretrained`` as given, ``quick_gelu``, ``digest``) and extra data
    <dir>/vocabulary.json   the Vocabulary the model was trained on
    <dir>/weights.pt        the tensors training changes, read back with ``torch.load(weights_only=True)``
    <dir>/train_state.pt    optional: optimizer / scheduler / scaler / RNG state and epoch, for resuming
    <dir>/digest.txt        ``checkpoint_digest`` of model.json, vocabulary.json and weights.pt (the model's id)

Format 2 stores what training changes: every parameter that requires grad, the buffers of modules that train
(BatchNorm statistics of an unfrozen ResNet block) and everything outside the CLIP towers (prompt context,
decoupling, head, the ``semantics`` / ``semantic_mean`` buffers). The frozen tower tensors are not stored: on load
the towers are rebuilt from the recorded weights source (``build_clip(clip, pretrained, quick_gelu)``) and their
sha256 ``digest`` (names sorted; dtype, shape and contiguous CPU bytes of every frozen tensor) must equal the one
recorded, else loading stops with both digests and the source. A frozen RN50 checkpoint is a few MB instead of
~400 MB (``bench/checkpoint_size.py``).

A checkpoint is *self-contained* (``weights.pt`` holds every tensor, no source is read on load) when the model has
no weights source (random towers: tests, the demo's tiny model), when nothing is frozen, or when asked
(``save_checkpoint(..., self_contained=True)``, ``export_checkpoint``, ``sarl export``): for serving where no
weights source is reachable. Tensors shared by two modules (the text tower is ``text`` and ``prompts.text``) are
stored once in either form.

Format 1 checkpoints (a full state dict) are still read, with the activation the model was trained with (open_clip
tags: the tag's; local files and random towers: the architecture config's, as the code of format 1 built them).
Unknown versions are refused. Nothing is unpickled as an arbitrary object: JSON for structure, tensors-only
``torch.load`` for weights, so a checkpoint from an untrusted store cannot run code. The model library reads local
files and open_clip tags only; a platform resolves an ``s3://`` weights source with ``resolve=`` or
``pretrained=``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from .backbone import PretrainedUnavailableError, resolve_quick_gelu
from .config import from_dict
from .model_config import ModelConfig
from .sarl import SARLModel
from .vocabulary import Vocabulary

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MODEL_FILE, VOCAB_FILE, WEIGHTS_FILE, TRAIN_STATE_FILE = "model.json", "vocabulary.json", "weights.pt", "train_state.pt"
IDENTITY_FILES = (MODEL_FILE, VOCAB_FILE, WEIGHTS_FILE)  # what a served model is; train_state.pt is not
DIGEST_FILE = "digest.txt"  # checkpoint_digest of the files, written by save_checkpoint beside them


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit its backbone (format, digest, tensor names)."""


# ------------------------------------------------------------------------------------------------ the state split
@dataclasses.dataclass
class StateSplit:
    """A model's state-dict entries, each tensor once, split into what training changes and the frozen towers.

    ``aliases`` maps every state-dict name of a shared tensor to the one name it is stored under.
    """

    trainable: dict[str, torch.Tensor]
    frozen: dict[str, torch.Tensor]
    aliases: dict[str, str]


def split_state(model: nn.Module) -> StateSplit:
    """Split ``model.state_dict()`` (a ``SARLModel``) into trainable and frozen-tower entries, shared tensors once.

    Frozen: a tensor of the CLIP towers (``visual``, ``text``) that is a parameter without ``requires_grad``, or a
    buffer of a module none of whose parameters train (such a module stays in eval mode, so its BatchNorm
    statistics do not move). Everything else, inside or outside the towers, is trainable.
    """
    model = _unwrap(model)
    trains: dict[int, bool] = {}
    for module in model.modules():
        module_trains = any(p.requires_grad for p in module.parameters())
        for p in module._parameters.values():
            if p is not None:
                trains[id(p)] = p.requires_grad
        for b in module._buffers.values():
            if b is not None:
                trains[id(b)] = module_trains
    towers = {id(t) for tower in (model.visual, model.text) for t in tower.state_dict(keep_vars=True).values()}
    split = StateSplit({}, {}, {})
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:  # the same tensor under a second name (prompts.text.* is text.*)
            split.aliases[name] = first[id(tensor)]
            continue
        first[id(tensor)] = split.aliases[name] = name
        frozen = id(tensor) in towers and not trains.get(id(tensor), True)
        (split.frozen if frozen else split.trainable)[name] = tensor.detach()
    return split


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors: names sorted, each name, dtype and shape, then its contiguous CPU bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def backbone_digest(model: nn.Module, split: StateSplit | None = None) -> str:
    """The digest of the model's frozen tower tensors (``tensors_digest``), computed once per model.

    It is recomputed only when a frozen tensor was replaced or written in place (``load_state_dict``, ``to``):
    the cache key holds every frozen tensor's name, device, address and version counter.
    """
    model = _unwrap(model)
    frozen = (split or split_state(model)).frozen
    signature = tuple((n, str(t.device), t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for n, t in frozen.items())
    cached = _DIGESTS.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    digest = tensors_digest(frozen)
    _DIGESTS[model] = (signature, digest)
    return digest


# ------------------------------------------------------------------------------------------------ saving
def save_checkpoint(model: SARLModel, directory: str | Path, train_state: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, self_contained: bool = False) -> Path:
    """Write ``model`` (and optionally a resumable ``train_state`` of tensors and plain data) to ``directory``.

    Only the trainable entries are stored, with the frozen backbone's identity; ``self_contained=True`` (or a model
    without a weights source, or nothing frozen) stores every tensor instead. See the module docstring.
    """
    model = _unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    if config.quick_gelu is None:  # a SARLModel resolves it when built; kept for models built otherwise
        config = dataclasses.replace(config, quick_gelu=resolve_quick_gelu(config.clip, config.pretrained))
    split = split_state(model)
    self_contained = bool(self_contained or config.pretrained is None or not split.frozen)
    backbone = {"clip": config.clip, "pretrained": config.pretrained, "quick_gelu": config.quick_gelu,
                "digest": backbone_digest(model, split), "frozen_tensors": len(split.frozen),
                "self_contained": self_contained}
    meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(config), "backbone": backbone,
            "extra": extra or {}}
    state = {**split.trainable, **split.frozen} if self_contained else split.trainable
    torch.save({k: v.cpu() for k, v in state.items()}, directory / WEIGHTS_FILE)
    (directory / VOCAB_FILE).write_text(json.dumps(model.vocabulary.to_dict(), indent=2))
    (directory / MODEL_FILE).write_text(json.dumps(meta, indent=2))
    # where the files are written, so a driver that never reads the weights (another node) can name the model
    (directory / DIGEST_FILE).write_text(checkpoint_digest(directory) + "\n")
    if train_state is not None:
        torch.save(train_state, directory / TRAIN_STATE_FILE)
    return directory


# ------------------------------------------------------------------------------------------------ reading
def _read_meta(directory: Path) -> tuple[dict[str, Any], ModelConfig, Vocabulary]:
    """model.json (format 1 given a ``backbone`` entry) with its config and the vocabulary."""
    if not (directory / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a SARL checkpoint (no {MODEL_FILE})")
    meta = json.loads((directory / MODEL_FILE).read_text())
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{directory}: checkpoint format {version!r} is not one this sarl reads "
                              f"({', '.join(map(str, READABLE_VERSIONS))}); it was written by another version")
    config = from_dict(ModelConfig, meta["config"], prefix="checkpoint.config")
    if version == 1:
        config = dataclasses.replace(config, quick_gelu=_format1_quick_gelu(config))
        meta["backbone"] = {"clip": config.clip, "pretrained": config.pretrained, "quick_gelu": config.quick_gelu,
                            "digest": None, "self_contained": True}
    vocabulary = Vocabulary.from_dict(json.loads((directory / VOCAB_FILE).read_text()), source=str(directory))
    return meta, config, vocabulary


def _format1_quick_gelu(config: ModelConfig) -> bool:
    """The activation format 1 code trained with: an open_clip tag's, else the architecture config's."""
    source = config.pretrained
    tag = (source is not None and isinstance(config.clip, str) and not os.path.isfile(os.path.expanduser(source))
           and source in open_clip.list_pretrained_tags_by_model(config.clip))
    return resolve_quick_gelu(config.clip, source if tag else None)


def read_checkpoint_meta(directory: str | Path) -> tuple[ModelConfig, Vocabulary, dict[str, Any]]:
    """The model config, vocabulary and extra metadata of a checkpoint, without loading weights."""
    meta, config, vocabulary = _read_meta(Path(directory))
    return config, vocabulary, meta.get("extra", {})


def checkpoint_backbone(directory: str | Path) -> dict[str, Any]:
    """The frozen backbone's identity: ``clip``, ``pretrained``, ``quick_gelu``, ``digest``, ``self_contained``."""
    return _read_meta(Path(directory))[0]["backbone"]


_RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "orthogonal_")
_skipping = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0


@contextmanager
def _no_random_init() -> Iterator[None]:
    """Build modules in this thread without drawing their random initial weights (``torch.nn.init``'s random
    fills do nothing): for a model whose every tensor is loaded right after, strictly. Loading an RN50 checkpoint
    took 1.8 s, 0.55 s of it drawing weights the checkpoint then overwrites (each Serve replica, predict actor
    and evaluation task loads one). Other threads building modules meanwhile still get their random weights."""
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            for name in _RANDOM_INITS:
                original = getattr(nn.init, name)

                def init(tensor: torch.Tensor, *args: Any, _original: Callable = original, **kwargs: Any):
                    return tensor if getattr(_skipping, "on", False) else _original(tensor, *args, **kwargs)

                init.__wrapped__ = original
                setattr(nn.init, name, init)
        _patch_users += 1
    outer, _skipping.on = getattr(_skipping, "on", False), True
    try:
        yield
    finally:
        _skipping.on = outer
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                for name in _RANDOM_INITS:
                    setattr(nn.init, name, getattr(nn.init, name).__wrapped__)


def _load_weights(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)


def _load_entries(model: SARLModel, state: dict[str, torch.Tensor], split: StateSplit, partial: bool,
                  where: Path) -> None:
    """Load ``state`` strictly: every stored name must exist; a name left out must be an alias of a stored tensor,
    or (``partial``) a frozen tower tensor."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{where}: {len(result.unexpected_keys)} stored tensor(s) the model does not have: "
                              f"{', '.join(result.unexpected_keys[:5])}")
    missing = [k for k in result.missing_keys
               if split.aliases.get(k) not in state and not (partial and split.aliases.get(k) in split.frozen)]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} tensor(s) of the model are not in the checkpoint: "
                              f"{', '.join(missing[:5])}")


def _check_digest(found: str, backbone: dict[str, Any], source: str | None, where: Path) -> None:
    expected = backbone.get("digest")
    if expected is not None and found != expected:
        raise CheckpointError(
            f"{where}: the frozen backbone does not match the checkpoint: {backbone['clip']} from weights source "
            f"{source!r} has digest {found}, the checkpoint was trained on {expected}. The weights file changed "
            f"or is another one than the model was trained from; give the original (pretrained=...) or load a "
            f"self-contained export of the checkpoint")


def checkpoint_digest(directory: str | Path) -> str:
    """``sha256:<hex>`` over the files that make the model (names and bytes of model.json, vocabulary.json and
    weights.pt): equal for two copies of one checkpoint, different for any other model."""
    h = hashlib.sha256()
    for name in IDENTITY_FILES:
        h.update(f"{name}\n".encode())
        with open(Path(directory) / name, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu", pretrained: str | None = None,
                    resolve: Callable[[str], str | os.PathLike] | None = None) -> SARLModel:
    """Rebuild the model of a checkpoint on ``map_location`` (returned there).

    Args:
        directory: a local checkpoint directory.
        map_location: the device the returned model lives on.
        pretrained: the frozen backbone's weights source, instead of the recorded one (e.g. a local copy of it).
        resolve: applied to the weights source (recorded or given) before it is read, e.g. the platform's node
            cache (``sarl.platform.node_cache.local_copy``) for ``s3://`` sources; returns a local path (or the
            source unchanged).

    A checkpoint of trainable weights rebuilds its towers from the source and refuses one whose digest differs;
    a self-contained one needs no source. Either way every stored tensor must fit the model (strict).
    """
    directory = Path(directory)
    meta, config, vocabulary = _read_meta(directory)
    backbone = meta["backbone"]
    state = _load_weights(directory)
    if backbone["self_contained"]:
        # Every tensor comes from the checkpoint, so the towers are built without reading a weights source.
        with _no_random_init():  # every tensor is loaded next (strict)
            model = SARLModel(config, vocabulary, semantics=state.get("semantics"), load_pretrained=False)
        split = split_state(model)
        _load_entries(model, state, split, partial=False, where=directory)
        _check_digest(backbone_digest(model, split), backbone, "(stored in the checkpoint)", directory)
    else:
        source = pretrained if pretrained is not None else backbone["pretrained"]
        if resolve is not None and source is not None:
            source = str(resolve(source))
        try:
            model = SARLModel(dataclasses.replace(config, pretrained=source), vocabulary,
                              semantics=state.get("semantics"))
        except (PretrainedUnavailableError, OSError) as exc:
            raise CheckpointError(
                f"{directory} holds the trained weights only; its frozen {config.clip} backbone is rebuilt from the "
                f"weights source {source!r}, which could not be read ({exc}). Give a local copy "
                f"(load_checkpoint(..., pretrained=PATH)) or use a self-contained export (sarl export)") from exc
        model.config = config  # the source as recorded (an s3:// URI stays one), not a local copy
        split = split_state(model)
        _check_digest(backbone_digest(model, split), backbone, source, directory)
        _load_entries(model, state, split, partial=True, where=directory)
    return model.to(map_location)


def load_trainable_state(model: nn.Module, directory: str | Path, verify: bool = True) -> None:
    """Load a checkpoint's weights into ``model``, which already has the towers (resuming training).

    Reads no weights source: the model's frozen towers stay as they are, after checking (``verify``) that their
    digest is the checkpoint's. A self-contained checkpoint loads every tensor.
    """
    model = _unwrap(model)
    directory = Path(directory)
    meta, _, _ = _read_meta(directory)
    backbone = meta["backbone"]
    split = split_state(model)
    if verify and not backbone["self_contained"]:
        _check_digest(backbone_digest(model, split), backbone, model.config.pretrained, directory)
    _load_entries(model, _load_weights(directory), split, partial=not backbone["self_contained"], where=directory)


def export_checkpoint(directory: str | Path, output: str | Path, pretrained: str | None = None,
                      resolve: Callable[[str], str | os.PathLike] | None = None) -> Path:
    """A self-contained copy of a checkpoint in ``output`` (every tensor stored; loads without a weights source).

    The source is read (and its digest checked) once, here. Files beside the weights (the job, the partial-label
    mask) are copied; the training state is not (an export is for serving and evaluation).
    """
    directory, output = Path(directory), Path(output)
    if output.resolve() == directory.resolve():
        raise ValueError(f"export {directory} to another directory, not onto itself")
    model = load_checkpoint(directory, pretrained=pretrained, resolve=resolve)
    _, _, extra = read_checkpoint_meta(directory)
    save_checkpoint(model, output, extra=extra, self_contained=True)
    for item in directory.iterdir():  # the export's own files (its digest.txt included) are not overwritten
        if item.name in (MODEL_FILE, VOCAB_FILE, WEIGHTS_FILE, TRAIN_STATE_FILE, DIGEST_FILE):
            continue
        if item.is_dir():
            shutil.copytree(item, output / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, output / item.name)
    return output


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


def restore_train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        resume_dir: Path, train_state: dict[str, Any], device: torch.device | str | torch.dtype):
    """Load a checkpoint's weights and optimizer / scheduler state into freshly built components on ``device``.

    The model moves first: ``Optimizer.load_state_dict`` casts each state tensor to its parameter's device (and
    dtype) as it loads, and a later ``Module.to`` (``prepare_model``) moves the parameters but not the optimizer
    state, so on a GPU the first step would mix devices (the foreach kernels refuse). Returns the model.
    """
    model.to(device)
    load_trainable_state(model, resume_dir)  # same towers: the backbone source is not read again
    optimizer.load_state_dict(train_state["optimizer"])
    scheduler.load_state_dict(train_state["scheduler"])
    return model
