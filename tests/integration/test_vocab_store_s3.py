"""The vocabulary store and ``sarl vocab`` on moto's S3 server over real HTTP (boto3, no patched clients)."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from sarl.cli.vocab import add_vocab_parser
from sarl.model.vocabulary import Category, Vocabulary, VocabularyError
from sarl.platform import storage
from sarl.platform.vocab_store import VocabStore, VocabStoreError, read_vocabulary_file

pytestmark = pytest.mark.integration


def vocab(version: str, *names: str) -> Vocabulary:
    return Vocabulary([Category(n) for n in names], version=version)


def vocab_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_vocab_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["vocab", *argv])
    return args.func(args)


def test_push_list_rollback_load(s3_bucket: str) -> None:
    root = f"s3://{s3_bucket}/vocab/"
    store = VocabStore(root)
    assert store.uri == f"s3://{s3_bucket}/vocab" and store.current_version() is None and store.versions() == []
    v1, v2 = vocab("1", "person", "dog"), vocab("2", "person", "dog", "zebra")
    store.push(v1)
    store.push(v2)
    assert storage.list_files(root) == ["CURRENT.json", "versions/1.json", "versions/2.json"]
    assert json.loads(storage.read_text(f"{root}versions/2.json")) == v2.to_dict()

    infos = store.versions(trained_names=["person", "dog"])
    assert [(i.version, i.categories, i.zero_shot, i.current) for i in infos] == [("1", 2, 0, False), ("2", 3, 1, True)]
    assert all(i.updated_at.endswith("Z") for i in infos)
    assert store.load() == v2

    store.set_current("1")
    assert store.current_version() == "1" and store.load() == v1
    with pytest.raises(VocabStoreError, match=r"known: 1, 2"):
        store.set_current("3")
    with pytest.raises(VocabStoreError, match="already exists with other content"):
        store.push(vocab("2", "cat"))
    assert store.push(vocab("2", "person", "dog", "zebra")) == "2" and store.load() == v2  # idempotent re-push

    storage.write_text(f"{root}versions/9.json", json.dumps({"version": "9", "categories": [{"name": "x",
                                                                                              "threshold": 2}]}))
    with pytest.raises(VocabularyError, match="outside"):
        store.load("9")


def test_pointer_poll_reads_only_the_pointer(s3_bucket: str) -> None:
    """A replica's poll is one GET of CURRENT.json: no listing, no version file."""
    store = VocabStore(f"s3://{s3_bucket}/vocab")
    store.push(vocab("1", "person"))
    store.push(vocab("2", "person", "cat"))
    calls: list[str] = []
    events = storage.s3_client().meta.events
    record = lambda model, **_: calls.append(model.name)  # noqa: E731
    events.register("before-call.s3", record)
    try:
        pointer = store.pointer()
    finally:
        events.unregister("before-call.s3", record)
    assert calls == ["GetObject"]
    assert pointer["version"] == "2" and pointer["fingerprint"] == vocab("2", "person", "cat").fingerprint()


def test_cli_and_vocabulary_file_on_s3(s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = f"s3://{s3_bucket}/store"
    file = f"s3://{s3_bucket}/incoming/vocab.yaml"
    storage.write_text(file, yaml.safe_dump(vocab("7", "person", "dog").to_dict()))
    assert read_vocabulary_file(file) == vocab("7", "person", "dog")
    with pytest.raises(FileNotFoundError):
        read_vocabulary_file(f"s3://{s3_bucket}/incoming/missing.json")

    assert vocab_cli("push", file, "--store", store) == 0
    assert capsys.readouterr().out == f"pushed version 7 (2 categories) to {store}; current: 7\n"
    assert vocab_cli("push", file, "--store", store, "--version", "8") == 0
    assert vocab_cli("rollback", "7", "--store", store) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "current: 7 (was 8)"
    assert vocab_cli("list", "--store", store) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[:2] for row in rows] == [["*", "7"], ["8", "2"]]

    missing_bucket = "s3://sarl-no-such-bucket-vocab/store"
    assert vocab_cli("show", "--store", missing_bucket) == 2
    assert capsys.readouterr().err.startswith("sarl vocab show: ")
    assert storage.s3_client().list_objects_v2(Bucket=s3_bucket, Prefix="store/")["KeyCount"] == 3
