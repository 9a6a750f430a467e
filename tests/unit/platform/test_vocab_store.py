"""sarl.platform.vocab_store and ``sarl vocab`` on a local store (S3: moto, in tests/integration)."""

from __future__ import annotations

import argparse
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from sarl.cli.vocab import add_vocab_parser
from sarl.model.vocabulary import Category, Vocabulary, VocabularyError
from sarl.platform import vocab_store
from sarl.platform.vocab_store import VocabStore, VocabStoreError, read_vocabulary_file


def vocab(version: str, *names: str) -> Vocabulary:
    return Vocabulary([Category(n, threshold=0.4) for n in names or ("person", "dog")], version=version)


INVALID = {  # two problems a user must see at once
    "version": "5",
    "categories": [{"name": "person", "aliases": ["human"]}, {"name": "man", "aliases": ["human"], "threshold": 1.5}],
}


def test_empty_store(tmp_path: Path) -> None:
    store = VocabStore(tmp_path / "store")
    assert store.current_version() is None and store.pointer() is None and store.versions() == []
    with pytest.raises(VocabStoreError, match="no current version"):
        store.load()
    with pytest.raises(VocabStoreError, match=r"no version '1' .*known: none"):
        store.load("1")


def test_push_load_current(tmp_path: Path) -> None:
    store = VocabStore(tmp_path)
    v1 = vocab("1")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    assert store.push(v1) == "1"
    assert store.current_version() == "1" and store.load() == v1 and store.load("1") == v1
    assert json.loads((tmp_path / "versions" / "1.json").read_text()) == v1.to_dict()  # nothing else in it
    pointer = store.pointer()
    assert set(pointer) == {"version", "updated_at", "fingerprint"} and pointer["fingerprint"] == v1.fingerprint()
    assert datetime.fromisoformat(pointer["updated_at"].replace("Z", "+00:00")) >= before

    v2 = vocab("2", "person", "dog", "cat")
    store.push(v2, make_current=False)
    assert store.current_version() == "1" and store.load() == v1 and store.load("2") == v2


def test_repush_identical_is_idempotent_and_moves_pointer(tmp_path: Path) -> None:
    store = VocabStore(tmp_path)
    store.push(vocab("1"))
    stored = tmp_path / "versions" / "1.json"
    os.utime(stored, (1_000_000_000, 1_000_000_000))
    store.push(vocab("2", "cat"))
    assert store.push(vocab("1")) == "1"
    assert store.current_version() == "1"
    assert stored.stat().st_mtime == 1_000_000_000  # not rewritten: the push time stays the first one


def test_versions_are_immutable(tmp_path: Path) -> None:
    store = VocabStore(tmp_path)
    store.push(vocab("3"))
    other = vocab("3", "person", "dog", "cat")
    with pytest.raises(VocabStoreError, match="version 3 already exists with other content; versions are immutable"):
        store.push(other)
    assert store.load("3") == vocab("3") and store.current_version() == "3"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "-x", "a b", "v1.json\n", "x" * 129, "é"])
def test_bad_version_names_are_refused(tmp_path: Path, bad: str) -> None:
    store = VocabStore(tmp_path)
    with pytest.raises(VocabStoreError, match="invalid version"):
        store.load(bad)
    with pytest.raises(VocabStoreError, match="invalid version"):
        store.set_current(bad)
    if bad:  # an empty version is already a VocabularyError in the model library
        with pytest.raises(VocabStoreError, match="invalid version"):
            store.push(vocab(bad))
    assert not (tmp_path / "versions").exists() and not (tmp_path.parent / "x.json").exists()


def test_good_version_names(tmp_path: Path) -> None:
    store = VocabStore(tmp_path)
    for name in ("v1.2-rc_3", "2024-05-01", "x" * 128):
        store.push(vocab(name))
        assert store.load() == vocab(name)


def test_set_current_rolls_back_and_lists_known_versions(tmp_path: Path) -> None:
    store = VocabStore(tmp_path)
    store.push(vocab("1"))
    store.push(vocab("2", "cat"))
    store.set_current("1")
    assert store.current_version() == "1" and store.load() == vocab("1")
    assert store.pointer()["fingerprint"] == vocab("1").fingerprint()
    with pytest.raises(VocabStoreError, match=r"no version '10' in .*\(known: 1, 2\)"):
        store.set_current("10")
    assert store.current_version() == "1"


def test_versions_sorted_by_push_time_with_current_flag(tmp_path: Path) -> None:
    store = VocabStore(tmp_path)
    for version, names, mtime in [("b", ("person",), 3000), ("a", ("person", "dog"), 1000), ("c", ("cat",), 2000)]:
        store.push(vocab(version, *names))
        os.utime(tmp_path / "versions" / f"{version}.json", (mtime, mtime))
    (tmp_path / "versions" / ".c.json.x.tmp").write_text("{")  # a crashed write's leftover is not a version
    store.set_current("a")
    infos = store.versions()
    assert [i.version for i in infos] == ["a", "c", "b"]
    assert [i.current for i in infos] == [True, False, False] and [i.categories for i in infos] == [2, 1, 1]
    assert infos[0].updated_at == "1970-01-01T00:16:40Z" and all(i.zero_shot is None for i in infos)
    assert [i.zero_shot for i in store.versions(trained_names=["Person", "dog"])] == [0, 1, 0]


def test_hand_written_invalid_version(tmp_path: Path) -> None:
    store = VocabStore(tmp_path)
    store.push(vocab("1"))
    (tmp_path / "versions" / "5.json").write_text(json.dumps(INVALID))
    with pytest.raises(VocabularyError) as info:
        store.load("5")
    assert any("'human' is used by more than one category" in p for p in info.value.problems)
    assert any("threshold 1.5 is outside [0, 1]" in p for p in info.value.problems)
    with pytest.raises(VocabularyError):
        store.set_current("5")  # an invalid version never becomes current
    assert store.current_version() == "1"
    assert [(i.version, i.categories) for i in store.versions()] == [("1", 2), ("5", 2)]

    (tmp_path / "versions" / "6.json").write_text("{not json")
    with pytest.raises(VocabularyError, match="not valid JSON"):
        store.load("6")
    (tmp_path / "versions" / "7.json").write_text(json.dumps(vocab("8").to_dict()))
    with pytest.raises(VocabularyError, match="does not match the file name"):
        store.load("7")


def test_current_version_edited_after_push_is_detected(tmp_path: Path) -> None:
    store = VocabStore(tmp_path)
    store.push(vocab("1"))
    (tmp_path / "versions" / "1.json").write_text(json.dumps(vocab("1", "cat").to_dict()))
    with pytest.raises(VocabStoreError, match="changed after it was pushed"):
        store.load()


def test_pointer_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = VocabStore(tmp_path)
    store.push(vocab("1"))
    store.push(vocab("2", "cat"))
    seen: list[str] = []
    errors: list[Exception] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                seen.append(store.pointer()["version"])
            except Exception as exc:  # a partial or empty file; the main thread asserts there was none
                errors.append(exc)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for i in range(100):
            store.set_current(str(1 + i % 2))
    finally:
        done.set()
        reader.join()
    assert not errors and seen and set(seen) <= {"1", "2"}
    assert sorted(os.listdir(tmp_path)) == ["CURRENT.json", "versions"]  # no temp files left behind

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(vocab_store.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.set_current("1")
    assert store.current_version() == "2"  # the 100 switches ended on "2"; the failed write left it intact
    assert sorted(os.listdir(tmp_path)) == ["CURRENT.json", "versions"]


def test_read_vocabulary_file(tmp_path: Path) -> None:
    v = vocab("4")
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(v.to_dict()))
    (tmp_path / "v.json").write_text(json.dumps(v.to_dict()))
    assert read_vocabulary_file(tmp_path / "v.yaml") == v == read_vocabulary_file(str(tmp_path / "v.json"))
    with pytest.raises(VocabularyError, match=r"must end in \.yaml, \.yml or \.json"):
        read_vocabulary_file(tmp_path / "v.txt")
    with pytest.raises(FileNotFoundError):
        read_vocabulary_file(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------------ CLI


def vocab_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_vocab_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["vocab", *argv])
    return args.func(args)


def test_cli_push_list_show_rollback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    file = tmp_path / "vocab.yaml"
    file.write_text(yaml.safe_dump(vocab("3", "person", "dog", "cat").to_dict()))
    assert vocab_cli("push", str(file), "--store", store) == 0
    assert capsys.readouterr().out == f"pushed version 3 (3 categories) to {store}; current: 3\n"
    assert vocab_cli("push", str(file), "--store", store, "--version", "4", "--no-current") == 0
    assert capsys.readouterr().out.endswith("current: 3\n")
    assert VocabStore(store).load("4").version == "4"

    os.utime(tmp_path / "store" / "versions" / "4.json", (2e9, 2e9))  # pushed later, whatever the clock says
    assert vocab_cli("list", "--store", store) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["version", "categories", "pushed", "at"]
    assert lines[1].split()[:3] == ["*", "3", "3"] and lines[2].split() == ["4", "3", "2033-05-18T03:33:20Z"]
    assert len({lines[0].index("pushed at")} | {line.rindex(line.split()[-1]) for line in lines[1:]}) == 1

    assert vocab_cli("show", "--store", store) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"# version 3 (current) in {store}"
    assert Vocabulary.from_dict(yaml.safe_load(out)) == vocab("3", "person", "dog", "cat")
    assert vocab_cli("show", "4", "--store", store, "--json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["version"] == "4" and "not current; current: 3" in captured.err

    assert vocab_cli("rollback", "4", "--store", store) == 0
    assert capsys.readouterr().out == "current: 4 (was 3)\n"
    assert vocab_cli("rollback", "9", "--store", store) == 2
    assert capsys.readouterr().err == f"sarl vocab rollback: no version '9' in {store} (known: 3, 4)\n"


def test_cli_refuses_invalid_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(INVALID))
    assert vocab_cli("push", str(bad), "--store", store) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"sarl vocab push: invalid vocabulary in {bad} (2 problems)")
    assert "'human' is used by more than one category" in captured.err and "threshold 1.5" in captured.err
    assert not (tmp_path / "store").exists()

    good = tmp_path / "good.json"
    good.write_text(json.dumps(vocab("1").to_dict()))
    assert vocab_cli("push", str(good), "--store", store, "--version", "../1") == 2
    assert capsys.readouterr().err.startswith("sarl vocab push: invalid version '../1'")
    assert vocab_cli("push", str(tmp_path / "missing.yaml"), "--store", store) == 2
    assert "sarl vocab push: vocabulary file not found" in capsys.readouterr().err
    assert vocab_cli("show", "--store", store) == 2
    assert capsys.readouterr().err.startswith("sarl vocab show: ") and not (tmp_path / "store").exists()
    assert vocab_cli("list", "--store", store) == 0
    assert capsys.readouterr().out == f"no versions in {store}\n"
