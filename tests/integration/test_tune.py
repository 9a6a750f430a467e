"""Ray Tune sweeps on the real local cluster: ASHA stops trials, the best job reproduces, an interrupted sweep
resumes without rerunning finished trials, and a sweep keeps its storage and feature cache on moto's S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sarl.platform import storage
from sarl.platform.job import load_job
from sarl.platform.train import run_training
from sarl.platform.tune import load_sweep, run_sweep

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "jobs" / "sweep_demo.yaml"
SMALL = ["overrides.data.options.num_images=240", "overrides.train.batch_size=16"]


def test_sweep_stops_trials_early_and_its_best_job_reproduces(ray_cluster, tmp_path):
    sweep, job = load_sweep(SWEEP, [f"storage_path={tmp_path / 'tune'}", *SMALL, "overrides.train.epochs=3"])
    result = run_sweep(sweep, job)
    trials = result["trials"]
    assert len(trials) == 4 and all(t["error"] is None for t in trials)
    assert {t["params"]["loss.name"] for t in trials} == {"asl", "wan"}
    assert {t["params"]["model.fusion"] for t in trials} == {"bilinear", "dot"}
    assert any(t["status"] == "stopped early" and t["epochs"] < 3 for t in trials), trials
    assert all("loss.params.gamma_neg" in t["params"] for t in trials if t["params"]["loss.name"] == "asl")
    assert not any("loss.params.gamma_neg" in t["params"] for t in trials if t["params"]["loss.name"] == "wan")
    assert [t["best"] for t in trials] == sorted((t["best"] for t in trials), reverse=True)

    out = Path(result["output_dir"])
    for name in ("trials.csv", "trials.md", "best_job.yaml"):
        assert (out / name).stat().st_size > 0
    assert (out / "val_map_per_trial.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "trials.md").read_text().count("\n") == 2 + 4

    best = result["best"]
    retrained = run_training(load_job(out / "best_job.yaml", [f"run.storage_path={tmp_path / 'best'}"]))
    assert retrained["metrics"]["val_mAP"] >= best["best"] - 0.5, (retrained["metrics"], best)


def _progress(experiment: Path) -> dict[str, str]:
    """Each Tune trial's progress.csv (one row per reported epoch), by trial directory name."""
    return {p.parent.name: p.read_text() for p in experiment.glob("run_trial_*/progress.csv")}


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path):
    import ray

    storage_path = tmp_path / "tune"
    args = [str(Path(sys.executable).parent / "sarl"), "tune", "--config", str(SWEEP), "--address",
            ray.get_runtime_context().gcs_address, f"storage_path={storage_path}", "max_concurrent_trials=1",
            "overrides.train.epochs=2", "scheduler.name=none", *SMALL]
    experiment = storage_path / "sweep_demo"
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        finished: list[str] = []
        while time.monotonic() < deadline and len(finished) < 2:
            time.sleep(1)
            finished = [name for name, text in _progress(experiment).items() if text.count("\n") == 1 + 2]
        assert len(finished) >= 2, "two trials did not finish in time"
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and exits
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    before = _progress(experiment)

    sweep, job = load_sweep(SWEEP, [f"storage_path={storage_path}", "max_concurrent_trials=1",
                                    "overrides.train.epochs=2", "scheduler.name=none", *SMALL])
    result = run_sweep(sweep, job)
    after = _progress(experiment)
    assert len(result["trials"]) == 4 and all(t["status"] == "completed" for t in result["trials"])
    for name in finished:  # not rerun: the same rows, no more
        assert after[name] == before[name]
    train_runs = sorted((experiment / "train").glob("*/history.jsonl"))
    assert len(train_runs) == 4
    for history in train_runs:  # each trial's Train run reported each epoch once
        epochs = [json.loads(line)["epoch"] for line in history.read_text().splitlines()]
        assert epochs == [1, 2], (history, epochs)


def test_sweep_with_storage_and_feature_cache_in_s3(ray_cluster, s3_bucket, tmp_path):
    root = f"s3://{s3_bucket}"
    sweep_file = tmp_path / "sweep_s3.yaml"
    sweep_file.write_text(f"""
name: sweep_s3
job: {REPO / "jobs" / "demo.yaml"}
overrides:
  model: {{unfreeze: none}}            # a frozen backbone: its features are cached
  data: {{options: {{num_images: 240, image_size: 64, seed: 0}}}}
  train: {{epochs: 2, batch_size: 16}}
  cache: {{enabled: true, root: {root}/cache}}
space:
  loss.name: {{grid: [asl, wan]}}
num_samples: 1
max_concurrent_trials: 1
scheduler: {{name: none}}
resources: {{num_workers: 1, cpus_per_worker: 0.9}}
storage_path: {root}/tune
output_dir: {tmp_path / "results"}
""")
    sweep, job = load_sweep(sweep_file)
    result = run_sweep(sweep, job)
    assert len(result["trials"]) == 2 and all(t["status"] == "completed" for t in result["trials"])
    assert storage.exists(f"{root}/tune/sweep_s3/results/best_job.yaml")
    assert any("experiment_state" in f for f in storage.list_files(f"{root}/tune/sweep_s3"))
    assert storage.list_files(f"{root}/cache"), "no feature cache entry in the bucket"
    first, second = sorted(result["trials"], key=lambda t: t["trial_id"])
    assert first["cache_misses"][0] > 0 and second["cache_hits"][0] > 0, result["trials"]
