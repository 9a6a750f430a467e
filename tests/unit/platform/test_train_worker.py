"""Pieces of the Ray Train worker loop and of ``sarl tune`` that need no cluster: the resume order of the optimizer
state, per-rank RNG streams, the collectives over ranks (on a real 2-process gloo group), the rerun check of a run
name, ASHA on epochs across a resumed sweep, and where a trial's driver takes its resources."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from sarl.model.checkpoint import save_checkpoint
from sarl.model.config import ConfigError, to_dict
from sarl.model.experiment import build_components
from sarl.platform.job import load_job
from sarl.platform.train import (
    SNAPSHOT_FILE,
    StepTogether,
    check_resume,
    global_train_stats,
    job_differences,
    reconcile_history,
    restore_train_state,
    rng_state,
    seed_rank,
)
from sarl.platform.tune import load_sweep

REPO = Path(__file__).resolve().parents[3]
CATEGORIES = ["circle", "square", "triangle"]


def _job(*overrides):
    return load_job(REPO / "jobs" / "demo.yaml", ["model.rank=16", "optim.name=sgd", *overrides])


def test_the_optimizer_state_is_loaded_where_the_parameters_are(tmp_path):
    """``restore_train_state`` moves the model before loading the optimizer state, so every state tensor sits with
    its parameter. A dtype stands in for the GPU here: ``Optimizer.load_state_dict`` casts state tensors to the
    parameter's device and dtype alike, and a later ``Module.to`` (``prepare_model``) moves neither. Loaded the
    old way (state first, then the move), the momentum buffers stay float32 beside float64 parameters."""
    job = _job()
    model, _, optimizer, scheduler = build_components(job, CATEGORIES, 4, 1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    save_checkpoint(model, tmp_path)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

    fresh, _, optimizer2, scheduler2 = build_components(job, CATEGORIES, 4, 1)
    restore_train_state(fresh, optimizer2, scheduler2, tmp_path, state, torch.float64)
    params = [p for g in optimizer2.param_groups for p in g["params"]]
    assert params and all(p.dtype == torch.float64 for p in params)
    for p in params:
        buffer = optimizer2.state[p]["momentum_buffer"]
        assert (buffer.device, buffer.dtype) == (p.device, p.dtype)
    assert scheduler2.last_epoch == scheduler.last_epoch


def test_every_rank_has_its_own_rng_stream_and_resumes_it():
    draws = []
    for rank in range(3):
        torch.manual_seed(7)  # what seed_everything(seed) left on every rank
        seed_rank(7, rank, 3, None)
        draws.append(torch.randint(0, 2**31, (4,)))
    assert len({tuple(d.tolist()) for d in draws}) == 3  # DataLoader base seeds differ between ranks
    torch.manual_seed(0)
    saved = [rng_state() for _ in range(2)]
    torch.randint(0, 2**31, (1,))
    saved[1] = rng_state()
    expected = torch.randint(0, 2**31, (4,))
    seed_rank(7, 1, 2, {"rng_per_rank": saved, "rng": saved[0]})
    assert torch.equal(torch.randint(0, 2**31, (4,)), expected)


def _collectives(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        # Rank 0 had 3 samples at loss 1.0, rank 1 had 1 sample at loss 5.0 and twice the time per sample.
        stats = [{"loss": 1.0, "samples": 3, "samples_per_s": 3.0, "skipped_images": 0, "lr": 0.1},
                 {"loss": 5.0, "samples": 1, "samples_per_s": 0.5, "skipped_images": 2, "lr": 0.1}][rank]
        merged = global_train_stats(stats, torch.device("cpu"))
        # Rank 1's second batch is all unreadable: both ranks must skip that step (and only that one).
        batches = [[(torch.ones(2, 1), torch.ones(2, 1), 0)] * 3,
                   [(torch.ones(2, 1), torch.ones(2, 1), 0), (torch.empty(0), torch.empty(0), 2),
                    (torch.ones(1, 1), torch.ones(1, 1), 1)]][rank]
        steps = [int(b[0].shape[0]) for b in StepTogether(batches, torch.device("cpu"))]
        Path(out, f"{rank}.json").write_text(json.dumps({"stats": merged, "steps": steps}))
    finally:
        torch.distributed.destroy_process_group()


def test_epoch_numbers_and_skipped_steps_are_agreed_over_ranks(tmp_path):
    # Forked: a spawned process would import this module (torch, Ray, open_clip) again, for tens of seconds.
    mp.start_processes(_collectives, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for r in results:  # the same numbers on every rank
        assert r["stats"]["loss"] == pytest.approx((3 * 1.0 + 1 * 5.0) / 4)  # weighted by samples, not rank 0's
        assert r["stats"]["samples"] == 4 and r["stats"]["skipped_images"] == 2
        assert r["stats"]["samples_per_s"] == pytest.approx(4 / 2.0)  # all samples over the slowest rank's time
    assert results[0]["steps"] == [2, 0, 2] and results[1]["steps"] == [2, 0, 1]


def _stored_run(tmp_path: Path, job) -> None:
    """A run directory as Train V2 leaves it: its snapshot names the latest checkpoint, which holds job.yaml."""
    run = tmp_path / job.run_name
    (run / "checkpoint_2026-12-01_00-00-00.000001").mkdir(parents=True)
    (run / "checkpoint_2026-12-01_00-00-00.000001" / "job.yaml").write_text(yaml.safe_dump(to_dict(job)))
    (run / SNAPSHOT_FILE).write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-12-01_00-00-00.000001"}}))


def test_a_rerun_resumes_only_the_same_job_unless_asked(tmp_path):
    base = [f"run.storage_path={tmp_path}", "run.name=r"]
    check_resume(_job(*base))  # no run yet: nothing to compare
    _stored_run(tmp_path, _job(*base, "run.max_failures=0"))
    check_resume(_job(*base, "run.max_failures=3", "train.progress=true"))  # how it runs may change
    with pytest.raises(ConfigError) as info:
        check_resume(_job(*base, "optim.lr=0.01", "data.known_proportion=0.5"))
    message = str(info.value)
    assert "optim.lr: 0.003 -> 0.01" in message and "data.known_proportion: 0.3 -> 0.5" in message
    assert "run.resume=always" in message and "max_failures" not in message
    check_resume(_job(*base, "optim.lr=0.01", "run.resume=always"))  # asked to: resumes, with a warning
    with pytest.raises(ConfigError, match="run.resume=never"):
        check_resume(_job(*base, "run.resume=never"))


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

    history.write_text(rows(1, 2, 3))  # epoch 3's row written, its checkpoint never committed
    reconcile_history(job, 2, checkpoint)
    assert epochs() == [1, 2]
    (checkpoint / "report.json").write_text(json.dumps({"epoch": 2, "val_mAP": 20.0}))
    history.write_text(rows(1))  # epoch 2's checkpoint committed, its row lost
    reconcile_history(job, 2, checkpoint)
    assert epochs() == [1, 2] and json.loads(history.read_text().splitlines()[1])["val_mAP"] == 20.0
    before = history.stat().st_mtime_ns
    reconcile_history(job, 2, checkpoint)  # already right: not rewritten
    assert history.stat().st_mtime_ns == before
    reconcile_history(job, 0, None)  # a restart from no checkpoint: epoch 1's row was never committed either
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
