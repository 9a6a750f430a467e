"""Pieces of a run and of ``sarl tune`` that need no cluster: the rerun check of a run name, the history a resume
leaves, ASHA on epochs across a resumed sweep, and where a trial's driver takes its resources. (The per-rank
helpers of the worker loop are tests/unit/model/test_distributed.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from sarl.model.config import ConfigError, to_dict
from sarl.platform.job import load_job
from sarl.platform.runs import Run, job_differences, resume_check
from sarl.platform.tune import load_sweep

REPO = Path(__file__).resolve().parents[3]
CATEGORIES = ["circle", "square", "triangle"]


def _job(*overrides):
    return load_job(REPO / "jobs" / "demo.yaml", ["model.rank=16", "optim.name=sgd", *overrides])


def test_a_rerun_resumes_only_the_same_job_unless_asked(tmp_path):
    """``resume_check`` against the job stored in the latest checkpoint (``Run.stored_job`` reads it from what
    Train committed: tests/integration/test_train.py reruns a real run)."""
    base = [f"run.storage_path={tmp_path}", "run.name=r"]
    stored = to_dict(_job(*base, "run.max_failures=0"))
    resume_check(_job(*base, "run.max_failures=3", "train.progress=true"), "ckpt", stored)  # how it runs may change
    with pytest.raises(ConfigError) as info:
        resume_check(_job(*base, "optim.lr=0.01", "data.known_proportion=0.5"), "ckpt", stored)
    message = str(info.value)
    assert "optim.lr: 0.003 -> 0.01" in message and "data.known_proportion: 0.3 -> 0.5" in message
    assert "run.resume=always" in message and "max_failures" not in message
    resume_check(_job(*base, "optim.lr=0.01", "run.resume=always"), "ckpt", stored)  # asked to: with a warning
    with pytest.raises(ConfigError, match="run.resume=never"):
        resume_check(_job(*base, "run.resume=never"), "ckpt", stored)


def test_a_run_without_a_committed_checkpoint_has_nothing_to_resume(tmp_path):
    job = _job(f"run.storage_path={tmp_path}", "run.name=r")
    run = Run.of(job)
    assert run.uri == str(tmp_path / "r") and run.result() is None and run.stored_job() is None
    (tmp_path / "r").mkdir()  # the folder exists, Train's snapshot not yet
    assert run.result() is None and run.latest_checkpoint() is None
    run.check_resume(job)  # nothing to compare


def test_a_resume_leaves_each_epoch_up_to_the_checkpoints_once_in_the_history(tmp_path):
    """Rows of epochs to be redone go; the checkpoint's own row comes back when the failure lost it."""
    job = _job(f"run.storage_path={tmp_path}", "run.name=r")
    history, checkpoint = tmp_path / "r" / "history.jsonl", tmp_path / "ckpt"
    history.parent.mkdir()
    checkpoint.mkdir()

    def rows(*epochs):
        return "".join(json.dumps({"epoch": e, "val_mAP": 10.0 * e}) + "\n" for e in epochs)

    def epochs():
        return [json.loads(line)["epoch"] for line in history.read_text().splitlines()]

    run = Run.of(job)
    history.write_text(rows(1, 2, 3))  # epoch 3's row written, its checkpoint never committed
    run.reconcile_history(2, checkpoint)
    assert epochs() == [1, 2]
    (checkpoint / "report.json").write_text(json.dumps({"epoch": 2, "val_mAP": 20.0}))
    history.write_text(rows(1))  # epoch 2's checkpoint committed, its row lost
    run.reconcile_history(2, checkpoint)
    assert epochs() == [1, 2] and json.loads(history.read_text().splitlines()[1])["val_mAP"] == 20.0
    before = history.stat().st_mtime_ns
    run.reconcile_history(2, checkpoint)  # already right: not rewritten
    assert history.stat().st_mtime_ns == before
    run.reconcile_history(0, None)  # a restart from no checkpoint: epoch 1's row was never committed either
    assert history.read_text() == ""


def test_job_differences_name_added_and_removed_keys():
    assert job_differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 1, "d": 3}}, ignored=()) == [
        "a.d: '(unset)' -> 3", "c: 2 -> '(unset)'"]


def test_asha_decides_on_epochs_with_the_rungs_it_had_before_a_resume(tmp_path):
    """A sweep resumed after trials a and b finished and c was interrupted after epoch 1: c's first report after
    the resume is epoch 2 but Tune iteration 1. The replayed rung at epoch 2 holds a's and b's values, so c,
    below them, stops; stock ASHA (training_iteration, empty rungs) would let it go on."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from sarl.platform.asha import EpochASHA

    histories = {"a": [0.8, 0.85, 0.9, 0.92], "b": [0.7, 0.8, 0.85, 0.9], "c": [0.6]}
    for trial, values in histories.items():
        (tmp_path / trial).mkdir()
        (tmp_path / trial / "history.jsonl").write_text(
            "".join(json.dumps({"epoch": e + 1, "val_mAP": v}) + "\n" for e, v in enumerate(values)))
    result = {"epoch": 2, "training_iteration": 1, "val_mAP": 0.5}
    decisions = {}
    for name, scheduler in {"epoch": EpochASHA(str(tmp_path), metric="val_mAP", mode="max", max_t=4,
                                                grace_period=1, reduction_factor=2),
                            "stock": ASHAScheduler(metric="val_mAP", mode="max", max_t=4, grace_period=1,
                                                   reduction_factor=2)}.items():
        trials = {t: SimpleNamespace(trial_id=t) for t in histories}
        for trial in trials.values():  # what Tuner.restore does for every trial, finished ones included
            scheduler.on_trial_add(None, trial)
        decisions[name] = scheduler.on_trial_result(None, trials["c"], result)
    assert decisions == {"epoch": TrialScheduler.STOP, "stock": TrialScheduler.CONTINUE}


def test_a_trial_driver_takes_its_cpu_from_the_trials_budget_or_lives_on_the_head(tmp_path):
    sweep, job = load_sweep(REPO / "jobs" / "sweep_demo.yaml")
    assert sweep.resources.driver() == {"cpu": 0.1}
    assert job["scaling"]["cpus_per_worker"] == pytest.approx(0.9)  # 0.9 + the driver's 0.1 = the budget of 1
    assert "driver_cpus" not in job["scaling"]
    head, head_job = load_sweep(REPO / "jobs" / "sweep_demo.yaml",
                                ["resources.driver_cpus=0", "resources.driver_resources={sarl_driver: 0.01}"])
    assert head.resources.driver() == {"cpu": 0, "sarl_driver": 0.01}
    assert head_job["scaling"]["cpus_per_worker"] == 1
    with pytest.raises(ConfigError, match="must ask for some resource"):
        load_sweep(REPO / "jobs" / "sweep_demo.yaml", ["resources.driver_cpus=0"])
    with pytest.raises(ConfigError, match="must be below resources.cpus_per_worker"):
        load_sweep(REPO / "jobs" / "sweep_demo.yaml", ["resources.driver_cpus=1"])


def test_the_scratch_of_workers_that_are_gone_is_removed_and_a_running_ones_stays(tmp_path, monkeypatch):
    """Issue 18, 7c: a rank Train killed (another failed; its trial was stopped) never runs its cleanup; the next
    Train worker on the machine removes what it left, of any run, but not the directories of a worker that runs."""
    import subprocess
    import sys
    import tempfile

    from sarl.platform.train import remove_orphaned_scratch, scratch_dir, scratch_prefix

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    job, other = (_job(f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}") for name in ("a", "b-p7-x"))
    running = scratch_dir(job, "worker", 0)  # this process's
    assert running.parent == tmp_path and running.name.startswith(scratch_prefix(job, "worker", 0))
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    dead = [tmp_path / f"{scratch_prefix(job, 'worker', 1)}p{gone}-k2j_9xq1",
            tmp_path / f"{scratch_prefix(other, 'checkpoint')}p{gone}-0abcdefg"]
    for path in dead:
        path.mkdir()
        (path / "weights.pt").write_bytes(b"w")
    unrelated = [tmp_path / "sarl-label-studio-0abcdefg", tmp_path / f"{scratch_prefix(job, 'worker', 1)}leftover"]
    for path in unrelated:
        path.mkdir()
    assert sorted(remove_orphaned_scratch()) == sorted(p.name for p in dead)
    assert running.is_dir() and all(p.is_dir() for p in unrelated) and not any(p.exists() for p in dead)


def test_a_worker_whose_epoch_fails_leaves_no_temporary_directory(tmp_path, monkeypatch):
    """Issue 18, 7c: a worker that fails after staging an epoch's checkpoint (its upload never started) removes the
    staging directory and its resume scratch, and the failure still reaches Train."""
    import tempfile

    import ray.train

    from sarl.platform import train

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0))
    job = _job(f"run.storage_path={tmp_path / 'runs'}")
    seen = []

    def failing_epoch(config, job, scratch, staged):
        staging = train.scratch_dir(job, "checkpoint")
        staged.append(staging)
        (staging / "weights.pt").write_bytes(b"w")
        (scratch / "resume.pt").write_bytes(b"r")
        seen.extend([scratch, staging])
        raise RuntimeError("the upload's storage went away")

    monkeypatch.setattr(train, "_train", failing_epoch)
    with pytest.raises(RuntimeError, match="storage went away"):
        train.train_loop_per_worker({"job": to_dict(job)})
    assert len(seen) == 2 and all(p.parent == tmp_path for p in seen)
    assert not any(p.exists() for p in seen) and list(tmp_path.glob("sarl-*")) == []
