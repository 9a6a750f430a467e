"""Checkpoint aliases and digests: what a Serve config points at and how a replica knows the model it serves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from sarl.model import Category, Vocabulary, create_model
from sarl.model.checkpoint import checkpoint_digest, save_checkpoint
from sarl.platform.aliases import AliasError, alias_uri, identify, publish_alias, read_alias, served_checkpoint


def tiny(directory: Path, seed: int, **extra) -> Path:
    torch.manual_seed(seed)
    model = create_model("tiny", Vocabulary([Category("a"), Category("b")], version="v"))
    return save_checkpoint(model, directory, train_state={"epoch": 1}, extra=extra or None)


def test_the_digest_covers_the_model_files_and_not_the_train_state(tmp_path: Path) -> None:
    directory = tiny(tmp_path / "c", 0)
    expected = hashlib.sha256()
    for name in ("model.json", "vocabulary.json", "weights.pt"):  # written independently of the code under test
        expected.update(f"{name}\n".encode() + (directory / name).read_bytes())
    assert checkpoint_digest(directory) == f"sha256:{expected.hexdigest()}"
    # written beside the files when saved: a driver on another node names the model without reading the weights
    assert (directory / "digest.txt").read_text().strip() == f"sha256:{expected.hexdigest()}"
    (directory / "train_state.pt").write_bytes(b"other optimizer state")
    assert checkpoint_digest(directory) == f"sha256:{expected.hexdigest()}"
    assert checkpoint_digest(tiny(tmp_path / "other", 1)) != checkpoint_digest(directory)


def test_an_alias_names_a_checkpoint_and_moves(tmp_path: Path) -> None:
    first, second = tiny(tmp_path / "first", 0), tiny(tmp_path / "second", 1)
    run = str(tmp_path / "runs" / "inspection")
    uri = publish_alias(run, "best", str(first), "inspection:epoch-3", {"val_mAP": 71.5})
    assert uri == alias_uri(run, "best") and uri.endswith("/aliases/best.json")
    record = read_alias(uri)
    assert record["checkpoint"] == str(first) and record["metrics"] == {"val_mAP": 71.5}
    served = served_checkpoint(uri)
    assert (served.model_id, served.digest, served.alias) == ("inspection:epoch-3", checkpoint_digest(first), uri)
    publish_alias(run, "best", str(second), "inspection:epoch-5")
    assert served_checkpoint(uri).digest == checkpoint_digest(second)
    # resolved when the app was built: later replicas serve that, wherever the alias points now
    assert served_checkpoint(uri, resolved=record).digest == checkpoint_digest(first)


def test_a_checkpoint_changed_after_its_alias_was_published_is_refused(tmp_path: Path) -> None:
    directory = tiny(tmp_path / "c", 0)
    uri = publish_alias(str(tmp_path / "run"), "best", str(directory), "run:epoch-1")
    meta = json.loads((directory / "model.json").read_text())
    meta["extra"] = {"epoch": 99}
    (directory / "model.json").write_text(json.dumps(meta))
    with pytest.raises(AliasError, match="changed after the alias was published"):
        served_checkpoint(uri)


def test_bad_alias_files_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(AliasError, match="no alias at"):
        read_alias(str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(AliasError, match="not valid JSON"):
        read_alias(str(tmp_path / "broken.json"))
    (tmp_path / "partial.json").write_text(json.dumps({"checkpoint": "x"}))
    with pytest.raises(AliasError, match="lacks model_id, digest"):
        read_alias(str(tmp_path / "partial.json"))


def test_without_an_alias_the_model_id_is_the_directory_and_its_epoch(tmp_path: Path) -> None:
    assert served_checkpoint(str(tiny(tmp_path / "checkpoint_000004", 0, epoch=4))).model_id == \
        "checkpoint_000004:epoch-4"
    assert served_checkpoint(str(tiny(tmp_path / "plain", 0))).model_id == "plain"


def test_a_driver_identifies_a_checkpoint_from_its_small_files(tmp_path: Path) -> None:
    """``identify`` (what ``sarl predict``'s driver hands its actors) reads model.json, vocabulary.json and
    digest.txt: the weights may be absent; the actor that loads them checks them against the digest."""
    directory = tiny(tmp_path / "checkpoint_000002", 0, epoch=2)
    digest = checkpoint_digest(directory)
    weights = (directory / "weights.pt").read_bytes()
    (directory / "weights.pt").unlink()
    model, config, vocabulary = identify(str(directory))
    assert (model.model_id, model.digest, model.alias) == ("checkpoint_000002:epoch-2", digest, None)
    assert config == create_model("tiny", Vocabulary([Category("a")])).config
    assert (vocabulary.names, vocabulary.version) == (["a", "b"], "v")
    assert model.resolved() == {"checkpoint": str(directory), "digest": digest, "model_id": model.model_id}
    uri = publish_alias(str(tmp_path / "run"), "best", str(directory), "run:epoch-2")
    named = identify(uri)[0]
    assert (named.model_id, named.alias, named.digest) == ("run:epoch-2", uri, digest)
    (directory / "digest.txt").write_text("sha256:" + "0" * 64 + "\n")
    with pytest.raises(AliasError, match="changed after the alias was published"):
        identify(uri)
    (directory / "weights.pt").write_bytes(weights)
    with pytest.raises(AliasError, match="changed after the alias was published"):
        served_checkpoint(str(directory), resolved=model.resolved() | {"digest": "sha256:" + "0" * 64})


def test_an_export_is_identified_by_its_own_digest_and_a_worker_accepts_its_copy(tmp_path: Path) -> None:
    """``sarl export`` then ``sarl predict`` (or an alias) on the export: the driver names the model from digest.txt,
    a worker checks its copy against that; the export's digest.txt is its own, not the source's copied over it."""
    from sarl.model.backbone import build_clip
    from sarl.model.checkpoint import export_checkpoint
    from sarl.model.factory import get_model_config

    weights = tmp_path / "clip-weights.pt"  # a local weights source: the checkpoint stores only what trained
    torch.save(build_clip(get_model_config("tiny-rn").clip).state_dict(), weights)
    model = create_model("tiny-rn", Vocabulary([Category("a"), Category("b")], version="v"), pretrained=str(weights))
    source = save_checkpoint(model, tmp_path / "source", extra={"epoch": 4})
    export = export_checkpoint(source, tmp_path / "export")  # every tensor stored: other files, another digest
    assert (export / "digest.txt").read_text().strip() == checkpoint_digest(export) != checkpoint_digest(source)
    identity, _, _ = identify(str(export))
    served = served_checkpoint(str(export), resolved=identity.resolved())  # what each scoring actor does
    assert served.digest == identity.digest and served.model_id == "export:epoch-4"
