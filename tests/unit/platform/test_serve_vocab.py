"""The Serve vocabulary watcher on a real store directory and the tiny model: store failures are retried with
backoff and nothing is remembered against the version; bad versions are remembered and never rebuilt; the
pointer's fingerprint is checked; limits refuse a version before it is built; clients see no path or message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sarl.model import Category, Vocabulary, create_model
from sarl.model.serving import bind_vocabulary
from sarl.platform.serve.vocabulary import (
    BUILD_FAILED,
    INVALID,
    TOO_LARGE,
    UNREACHABLE,
    VocabularyLimits,
    VocabularyWatcher,
    limit_problems,
)
from sarl.platform.vocab_store import VocabStore

NAMES = ["ace", "king", "queen"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny", Vocabulary([Category(n) for n in NAMES], version="trained")).eval()


def version(name: str, *extra: Category, threshold: float = 0.5) -> Vocabulary:
    return Vocabulary([*(Category(n, threshold=threshold) for n in NAMES), *extra], version=name)


def watcher_for(model, store: VocabStore, limits: VocabularyLimits = VocabularyLimits()):
    builds: list[str] = []
    outcomes: list[str] = []

    def bind(vocabulary):
        builds.append(vocabulary.version)
        return bind_vocabulary(model, vocabulary)

    clock = Clock()
    watcher = VocabularyWatcher(store, bind_vocabulary(model, model.vocabulary), bind, model.vocabulary, limits,
                                on_outcome=outcomes.append, clock=clock)
    return watcher, builds, outcomes, clock


def test_follows_the_pointer_and_builds_each_version_once(model, tmp_path: Path) -> None:
    store = VocabStore(tmp_path / "store")
    watcher, builds, outcomes, _ = watcher_for(model, store)
    assert watcher.refresh(None, 1.0, 60.0) == "unchanged" and watcher.state()["source"] == "checkpoint"
    store.push(version("1"))
    assert watcher.refresh(None, 1.0, 60.0) == "loaded"
    assert watcher.refresh(None, 1.0, 60.0) == "unchanged"
    assert builds == ["1"] and outcomes == ["loaded"] and watcher.bound.version == "1"
    assert watcher.state()["source"] == "store" and watcher.state()["last_error"] is None


def test_an_unreachable_store_is_retried_with_backoff_and_the_version_loads_when_it_returns(model, tmp_path) -> None:
    root = tmp_path / "store"
    store = VocabStore(root)
    store.push(version("1"))
    watcher, builds, outcomes, clock = watcher_for(model, store)
    # The store's mount goes bad: a file where the directory was (NotADirectoryError, an OSError).
    shutil.move(root, tmp_path / "away")
    root.write_text("")
    delays = []
    for _ in range(5):
        assert watcher.refresh(None, 1.0, 6.0) == UNREACHABLE
        retry_in = watcher.state()["last_error"]["retry_in_s"]
        delays.append(retry_in)
        assert watcher.refresh(None, 1.0, 6.0) == "waiting"  # not before its time
        clock.now += retry_in + 0.1  # retry_in_s is rounded to 0.1 s
    # 1, 2, 4, then capped at 6 (each with up to 20 % jitter below)
    for got, full in zip(delays, [1, 2, 4, 6, 6]):
        assert 0.8 * full - 0.05 <= got <= full + 0.05, delays
    assert watcher.bound.version == "trained" and builds == []  # the checkpoint's vocabulary kept serving
    assert outcomes == [UNREACHABLE] * 5
    root.unlink()
    shutil.move(tmp_path / "away", root)
    assert watcher.refresh(None, 1.0, 6.0) == "loaded"  # no push needed
    assert watcher.bound.version == "1" and watcher.state()["last_error"] is None


def test_a_bad_version_is_remembered_and_not_rebuilt_until_the_pointer_moves(model, tmp_path: Path) -> None:
    store = VocabStore(tmp_path / "store")
    store.push(version("1"))
    watcher, builds, outcomes, _ = watcher_for(model, store)
    assert watcher.refresh(None, 1.0, 60.0) == "loaded"
    # "2" has a zero-shot category whose explicit semantic vector has the wrong dimension: the build raises
    store.push(version("2", Category("joker", vector=[1.0, 2.0])))
    for _ in range(3):
        assert watcher.refresh(None, 1.0, 60.0) == BUILD_FAILED
    assert builds == ["1", "2"] and outcomes == ["loaded", BUILD_FAILED]  # built once, then remembered
    assert watcher.bound.version == "1" and watcher.state()["last_error"]["kind"] == BUILD_FAILED
    store.push(version("3"))
    assert watcher.refresh(None, 1.0, 60.0) == "loaded" and watcher.state()["last_error"] is None


def test_content_that_differs_from_the_pointers_fingerprint_is_refused(model, tmp_path: Path) -> None:
    store = VocabStore(tmp_path / "store")
    store.push(version("1"))
    watcher, builds, _, _ = watcher_for(model, store)
    # version 1's file rewritten in place after the push (versions are immutable): the pointer still names it
    (tmp_path / "store" / "versions" / "1.json").write_text(json.dumps(version("1", threshold=0.9).to_dict()))
    assert watcher.refresh(None, 1.0, 60.0) == INVALID
    assert builds == [] and watcher.bound.version == "trained"


def test_limits_refuse_a_version_before_it_is_built(model, tmp_path: Path) -> None:
    store = VocabStore(tmp_path / "store")
    limits = VocabularyLimits(max_categories=5, max_prompt_tokens=12)
    watcher, builds, _, _ = watcher_for(model, store, limits)
    long_prompt = Category("joker", prompt="a photo of a {name} " + "with many words " * 4)
    store.push(version("wordy", long_prompt))
    assert watcher.refresh(None, 1.0, 60.0) == TOO_LARGE
    store.push(Vocabulary([Category(f"c{i}") for i in range(6)], version="wide"))
    assert watcher.refresh(None, 1.0, 60.0) == TOO_LARGE
    assert builds == []
    problems = limit_problems(version("x", long_prompt), limits, model.vocabulary)
    assert len(problems) == 1 and "'joker'" in problems[0] and "over the limit of 12" in problems[0]
    # a trained category's prompt is learnt, not tokenised: never counted
    assert limit_problems(version("y"), VocabularyLimits(max_prompt_tokens=3), model.vocabulary) == []


def test_a_pinned_version_is_served_and_unpinning_follows_the_pointer_again(model, tmp_path: Path) -> None:
    store = VocabStore(tmp_path / "store")
    store.push(version("1"))
    store.push(version("2", threshold=0.3), make_current=False)  # staged: the fleet does not follow it
    watcher, _, _, _ = watcher_for(model, store)
    assert watcher.refresh(None, 1.0, 60.0) == "loaded" and watcher.bound.version == "1"
    assert watcher.refresh("2", 1.0, 60.0, force=True) == "loaded" and watcher.bound.version == "2"
    assert watcher.refresh(None, 1.0, 60.0, force=True) == "loaded" and watcher.bound.version == "1"


def test_the_state_clients_see_names_no_store_and_no_message(model, tmp_path: Path) -> None:
    root = tmp_path / "secret-bucket-name"
    store = VocabStore(root)
    watcher, _, _, _ = watcher_for(model, store)
    root.write_text("")  # unreachable from the start: the replica still serves, with the checkpoint's vocabulary
    assert watcher.refresh(None, 1.0, 60.0) == UNREACHABLE
    state = watcher.state()
    assert state["version"] == "trained" and state["source"] == "checkpoint"
    assert state["last_error"]["kind"] == UNREACHABLE and "message" not in state["last_error"]
    assert "secret-bucket-name" not in json.dumps(state)
    assert "secret-bucket-name" in watcher.last_error["message"]  # kept for the log
