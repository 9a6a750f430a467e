"""Shared test set-up: offline hub, small thread counts (2-core CI), paths to shared data."""

import os

# Hub look-ups must fail fast and offline (no retries against an unreachable host).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Train V2's controller polls its workers every 2 s (Ray's default): a run's reports, its end and its shutdown each
# wait for a poll, about 7 s of a small test run's 22 s here. Every cluster the tests start (in-process, `ray start`
# for the two-node test, `sarl` subprocesses) inherits this; users keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# ... and starts a PreemptionWatcher actor per run (a process of its own) that watches for nodes being drained (spot
# instances); the test clusters' nodes never are. Users keep it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def cards_voc_dir() -> Path | None:
    """../shared/data/cards_voc beside the checkout (or $SARL_CARDS_VOC), if present."""
    env = os.environ.get("SARL_CARDS_VOC")
    path = Path(env) if env else REPO.parent / "shared" / "data" / "cards_voc"
    return path if path.is_dir() else None


@pytest.fixture
def cards_voc() -> Path:
    path = cards_voc_dir()
    if path is None:
        pytest.skip("cards_voc photos absent (../shared/data/cards_voc or $SARL_CARDS_VOC)")
    return path


@pytest.fixture
def make_tree():
    """Writes a small folder tree (three files, two levels deep) under a given root: storage tests copy it."""

    def make(root: Path) -> None:
        (root / "sub" / "deep").mkdir(parents=True)
        (root / "a.txt").write_text("a")
        (root / "sub" / "b.bin").write_bytes(b"\x00\x01")
        (root / "sub" / "deep" / "c.json").write_text("{}")

    return make
