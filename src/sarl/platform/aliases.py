"""Named aliases of checkpoints: what a Serve config points at, and what training moves.

An alias is a small JSON file beside the run, ``<storage_path>/<run>/aliases/<name>.json``::

    {"alias": "best", "checkpoint": "s3://bucket/runs/voc-rn101/checkpoint_...", "model_id": "voc-rn101:epoch-12",
     "digest": "sha256:...", "metrics": {"val_mAP": 91.2}, "published_at": "2026-12-01T12:00:00Z"}

``sarl train`` publishes ``best`` (and ``run.alias``, when the job names one) after a run. A Serve config's
``checkpoint`` may be a checkpoint directory or an alias file; a replica resolves the alias when it starts, and
refuses a checkpoint whose digest is not the one published. Serve rebuilds replicas only when the config
changes, so a rollout is ``sarl serve --config ...`` (which resolves the alias into the deployed arguments, so
a moved alias is a changed config and Serve rolls the replicas over) or an edit of the config's ``checkpoint``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..model.checkpoint import DIGEST_FILE, MODEL_FILE, VOCAB_FILE, checkpoint_digest, read_checkpoint_meta
from ..model.model_config import ModelConfig
from ..model.vocabulary import Vocabulary
from . import node_cache, storage

ALIAS_DIR = "aliases"


class AliasError(ValueError):
    """An alias file that cannot be used: unreadable, missing fields, or a checkpoint that is not the published one."""


def alias_uri(run_uri: str, name: str) -> str:
    return storage.join(run_uri, ALIAS_DIR, f"{name}.json")


def is_alias(uri: str) -> bool:
    return str(uri).endswith(".json")


def publish_alias(run_uri: str, name: str, checkpoint: str, model_id: str,
                  metrics: dict[str, Any] | None = None) -> str:
    """Point alias ``name`` of the run at ``run_uri`` to ``checkpoint``; returns the alias file's URI."""
    digest = stored_digest(checkpoint)
    record = {"alias": name, "checkpoint": checkpoint, "model_id": model_id, "digest": digest,
              "metrics": metrics or {},
              "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")}
    uri = alias_uri(run_uri, name)
    storage.write_text(uri, json.dumps(record, indent=2) + "\n")  # atomic: a replica never reads half of it
    return uri


def stored_digest(checkpoint: str) -> str:
    """The digest ``save_checkpoint`` wrote beside the files (one small read: the driver of a run on other nodes
    downloads no weights), else computed from a local copy (checkpoints older than the digest file)."""
    try:
        return storage.read_text(storage.join(checkpoint, DIGEST_FILE)).strip()
    except FileNotFoundError:
        return checkpoint_digest(node_cache.local_copy(checkpoint))


def read_alias(uri: str) -> dict[str, Any]:
    try:
        record = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise AliasError(f"no alias at {uri}") from None
    except json.JSONDecodeError as e:
        raise AliasError(f"{uri} is not valid JSON: {e}") from None
    missing = [k for k in ("checkpoint", "model_id", "digest") if not isinstance(record.get(k), str)]
    if missing:
        raise AliasError(f"{uri} lacks {', '.join(missing)}")
    return record


@dataclass(frozen=True)
class CheckpointIdentity:
    """Which model a checkpoint is: its directory (an alias resolved), model id, digest, and the alias if any."""

    uri: str
    model_id: str
    digest: str
    alias: str | None = None  # the alias file it was resolved from

    def resolved(self) -> dict[str, str]:
        """The record ``served_checkpoint(resolved=...)`` takes: a worker checks its copy against the digest."""
        return {"checkpoint": self.uri, "digest": self.digest, "model_id": self.model_id}


@dataclass(frozen=True, kw_only=True)
class ServedCheckpoint(CheckpointIdentity):
    """A checkpoint as a replica or a scoring actor loads it: its identity and its local copy."""

    local: Path


def resolve(uri: str) -> tuple[str, dict[str, Any] | None]:
    """``(checkpoint URI, alias record or None)`` for a checkpoint directory or an alias file."""
    if not is_alias(uri):
        return uri, None
    record = read_alias(uri)
    return record["checkpoint"], record


def _identity(uri: str, checkpoint: str, record: dict[str, Any] | None, digest: str,
              extra: dict[str, Any]) -> CheckpointIdentity:
    """The identity of ``checkpoint`` whose files have ``digest``; one named by an alias must be the published one."""
    if record is None:
        return CheckpointIdentity(checkpoint, _model_id(extra, checkpoint), digest)
    if record["digest"] != digest:
        raise AliasError(f"alias {uri} names {checkpoint} with digest {record['digest']}, but its files have "
                         f"{digest}: the checkpoint changed after the alias was published")
    return CheckpointIdentity(checkpoint, record["model_id"], digest, uri)


def checkpoint_meta(checkpoint: str) -> tuple[ModelConfig, Vocabulary, dict[str, Any]]:
    """``read_checkpoint_meta`` of a checkpoint directory or ``s3://`` prefix: only model.json and vocabulary.json
    are read (into a temporary folder, not the node's cache), never the weights."""
    if not storage.is_s3(checkpoint):
        return read_checkpoint_meta(checkpoint)
    with tempfile.TemporaryDirectory(prefix="sarl-meta-") as tmp:
        for name in (MODEL_FILE, VOCAB_FILE):
            storage.download_file(storage.join(checkpoint, name), Path(tmp) / name)
        return read_checkpoint_meta(tmp)


def identify(uri: str) -> tuple[CheckpointIdentity, ModelConfig, Vocabulary]:
    """Identity, model config and vocabulary of the checkpoint at ``uri`` (a directory or an alias file), from its
    small files: model.json, vocabulary.json and digest.txt. What a driver hands the workers that score: they copy
    the weights on their own nodes; this copies none."""
    checkpoint, record = resolve(uri)
    config, vocabulary, extra = checkpoint_meta(checkpoint)
    return _identity(uri, checkpoint, record, stored_digest(checkpoint), extra), config, vocabulary


def served_checkpoint(uri: str, resolved: dict[str, Any] | None = None) -> ServedCheckpoint:
    """Resolve, copy (``s3://``) and identify the checkpoint at ``uri`` (a directory or an alias file); the digest
    is computed from the copy.

    ``resolved``: the record read when the app was built or by a driver (``checkpoint``, ``digest``,
    ``model_id``), used instead of reading the alias again.
    """
    checkpoint, record = (resolved["checkpoint"], resolved) if resolved else resolve(uri)
    local = node_cache.local_copy(checkpoint)
    extra = json.loads((local / MODEL_FILE).read_text()).get("extra") or {}
    identity = _identity(uri, checkpoint, record, checkpoint_digest(local), extra)
    return ServedCheckpoint(identity.uri, identity.model_id, identity.digest, identity.alias, local=local)


def _model_id(extra: dict[str, Any], uri: str) -> str:
    """``<directory name>[:epoch-<k>]`` of a checkpoint not named through an alias."""
    name = Path(str(uri).rstrip("/")).name
    return f"{name}:epoch-{extra['epoch']}" if "epoch" in extra else name


__all__ = ["ALIAS_DIR", "AliasError", "CheckpointIdentity", "ServedCheckpoint", "alias_uri", "checkpoint_meta",
           "identify", "is_alias", "publish_alias", "read_alias", "resolve", "served_checkpoint"]
