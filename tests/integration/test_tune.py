"""Ray Tune sweeps on the real local cluster: ASHA stops trials, the best job reproduces, an interrupted sweep
resumes (with ASHA) without rerunning finished trials or repeating epochs, a sweep keeps its storage and feature
cache on moto's S3 and writes no credential anywhere, and trial drivers do not starve whole-node workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sarl.model.config import ConfigError
from sarl.platform import storage
from sarl.platform.job import load_job
from sarl.platform.train import run_training
from sarl.platform.tune import load_sweep, run_sweep

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "jobs" / "sweep_demo.yaml"
SMALL = ["overrides.data.options.num_images=240", "overrides.train.batch_size=16"]


def _progress(experiment: Path) -> dict[str, str]:
    """Each Tune trial's progress.csv (one row per reported epoch), by trial directory name."""
    return {p.parent.name: p.read_text() for p in experiment.glob("run_trial_*/progress.csv")}


def _epochs(progress_csv: str) -> list[int]:
    """The ``epoch`` column of a progress.csv as written (every row, repeats included)."""
    import csv
    import io

    return [int(float(row["epoch"])) for row in csv.DictReader(io.StringIO(progress_csv))]


def test_interrupted_sweep_with_asha_resumes_stops_trials_early_and_its_best_job_reproduces(ray_cluster, tmp_path):
    """Ctrl-C once a trial finished and another reported its first epoch or two (ASHA's first rung is epoch 1), or
    the first two trials both finished (the last two then start in the resumed sweep), then the same sweep again.
    ASHA (grace 1, reduction 3, 3 epochs: a rung at epoch 1, max_t 3) decides on the reported epoch: a resumed
    trial continues at epoch k+1 while its Tune iteration starts at 1 again. The resumed sweep's results are then
    those of any sweep: every grid point, conditional parameters only where they apply, trials stopped early, the
    tables and plot, and a best job that reproduces its score under ``sarl train``.

    Issue 18, 7b on the local cluster (``init_ray`` starting one, as ``sarl tune`` without ``--address`` does, and
    the session's cluster): a trial ASHA stops in this process takes its Train controller with it, and Train's
    detached cleaner must remove the run's placement group; this driver lives on, so nothing else would."""
    import ray
    from ray.util import placement_group_table

    groups_before = set(placement_group_table())
    storage_path = tmp_path / "tune"
    overrides = [f"storage_path={storage_path}", "overrides.train.epochs=3", *SMALL]
    args = [str(Path(sys.executable).parent / "sarl"), "tune", "--config", str(SWEEP), "--address",
            ray.get_runtime_context().gcs_address, *overrides]
    experiment = storage_path / "sweep_demo"
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        finished: list[str] = []
        while time.monotonic() < deadline:
            time.sleep(0.5)
            progress = _progress(experiment)
            finished = [name for name, text in progress.items() if len(_epochs(text)) == 3]
            # Both first trials finished: waiting for a report of the next two let the sweep end before the Ctrl-C
            # (seen), and the resumed sweep then ran nothing.
            if finished and (len(finished) > 1 or any(len(_epochs(text)) in (1, 2) for text in progress.values())):
                break
        assert finished, "no trial finished in time"
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and exits
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    before = _progress(experiment)

    sweep, job = load_sweep(SWEEP, overrides)
    assert sweep.scheduler.name == "asha"
    result = run_sweep(sweep, job, resume=True)
    after = _progress(experiment)
    assert len(result["trials"]) == 4 and all(t["error"] is None for t in result["trials"]), result["trials"]

    # This driver's placement groups (the resumed sweep's, Tune's and Train's: a group's id ends with its creator's
    # job id) not yet removed. Not the interrupted subprocess's: once, a group of that job, whose trial was starting
    # its workers as the Ctrl-C came, was still CREATED here, a minute after the job ended (its removal is Ray's).
    job_id = ray.get_runtime_context().get_job_id()

    def live_groups() -> dict[str, str]:
        return {pg: row["state"] for pg, row in placement_group_table().items()
                if pg not in groups_before and pg.endswith(job_id) and row["state"] != "REMOVED"}

    deadline = time.monotonic() + 30  # the cleaner looks once a second
    while live_groups() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert live_groups() == {}
    assert len(set(placement_group_table()) - groups_before) >= 4  # one of Train's per trial at least
    for name in finished:  # not rerun: the same rows, no more
        assert after[name] == before[name]
    train_runs = {h.parent.name: h for h in (experiment / "train").glob("*/history.jsonl")}
    assert len(train_runs) == 4
    tune_epochs = {"_".join(name.split("_")[2:4]): _epochs(text) for name, text in after.items()}  # by trial id
    for trial in result["trials"]:  # each trial's Train run wrote each epoch once; the results show them all
        epochs = [json.loads(line)["epoch"] for line in train_runs[trial["trial_id"]].read_text().splitlines()]
        assert epochs == list(range(1, len(epochs) + 1)) and len(trial["curve"]) == len(epochs), (trial, epochs)
        # What Tune recorded: no epoch twice, in order, none Train did not write. It can lack an epoch Train
        # committed just before the Ctrl-C, whose report never reached Tune (the resumed trial goes on after it,
        # e.g. [1, 3]): tune._trials takes the curves from the Train histories.
        seen = tune_epochs[trial["trial_id"]]
        assert seen == sorted(set(seen)) and set(seen) <= set(epochs), (trial["trial_id"], seen, epochs)
        if epochs[-1] < 3:  # stopped by ASHA, which decides at its rung, epoch 1. The report reaches Tune through
            # a queue Train does not wait on, so Train can finish more epochs before the stop lands (seen: [1, 2]).
            assert trial["status"] == "stopped early" and seen[-1] == 1, (trial, seen, epochs)

    trials = result["trials"]
    # ... and such a trial was stopped in this process, before its Train run's last epoch (a run that finished
    # before ASHA's stop landed reads "stopped early" too, but shut its controller down and freed its group itself)
    resumed = {"_".join(name.split("_")[2:4]) for name, text in after.items() if text != before.get(name)}
    assert any(t["trial_id"] in resumed and t["status"] == "stopped early" and t["epochs"] < 3 for t in trials), (
        resumed, trials)
    assert {t["params"]["loss.name"] for t in trials} == {"asl", "wan"}
    assert {t["params"]["model.fusion"] for t in trials} == {"bilinear", "dot"}
    assert any(t["status"] == "stopped early" and t["stopped_at"] < 3 for t in trials), trials
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


def test_sweep_with_storage_and_feature_cache_in_s3_and_whole_node_workers(ray_cluster, s3_bucket, tmp_path, capfd):
    """Storage and feature cache on S3, and no credential written anywhere. Each trial's single worker asks for
    every CPU of the biggest node: the driver's 0.1 CPU comes out of that budget (the worker asks for the rest),
    so both fit; with the driver's CPU on top, the worker never fitted anywhere and the trial waited forever.
    Custom driver resources that no node has are refused up front."""
    import ray

    # The biggest node's CPUs, or what is free of them (the session's Serve apps may hold some).
    node_cpus = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    node_cpus = min(node_cpus, int(ray.available_resources().get("CPU", 0) * 10) / 10)
    assert node_cpus >= 1, ray.available_resources()
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
resources: {{num_workers: 1, cpus_per_worker: {node_cpus}}}
storage_path: {root}/tune
output_dir: {tmp_path / "results"}
""")
    sweep, job = load_sweep(sweep_file, ["resources.driver_cpus=0",
                                         "resources.driver_resources={sarl_no_such_resource: 0.01}"])
    with pytest.raises(ConfigError, match="sarl_no_such_resource"):
        run_sweep(sweep, job)
    sweep, job = load_sweep(sweep_file)
    assert job["scaling"]["cpus_per_worker"] == pytest.approx(node_cpus - 0.1)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    assert len(secret) >= 16  # conftest's distinctive fake secret: found nowhere by chance
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    logs_before = {p: p.stat().st_size for p in logs.rglob("*") if p.is_file()}
    handler = signal.getsignal(signal.SIGINT)
    result = run_sweep(sweep, job)
    assert signal.getsignal(signal.SIGINT) is handler  # Tune's fit() left its own: a later Ctrl-C did nothing
    assert len(result["trials"]) == 2 and all(t["status"] == "completed" for t in result["trials"])
    assert storage.exists(f"{root}/tune/sweep_s3/results/best_job.yaml")
    # No credential in anything the sweep wrote (Tune's tuner.pkl and experiment state included) ...
    written = storage.download_dir(root, tmp_path / "bucket")
    files = [p for p in written.rglob("*") if p.is_file()]
    assert any(p.name == "tuner.pkl" for p in files), sorted(p.name for p in files)
    assert [str(p) for p in files if secret in p.read_bytes()] == []
    # ... nor in any log line of the run: this process's output and the cluster's logs (workers, drivers, raylet)
    out, err = capfd.readouterr()
    assert secret not in (out + err).encode()
    grown = [p for p in logs.rglob("*") if p.is_file() and p.stat().st_size != logs_before.get(p)]
    assert grown, "the run wrote no log"
    assert [str(p) for p in grown if secret in p.read_bytes()] == []
    assert any("experiment_state" in f for f in storage.list_files(f"{root}/tune/sweep_s3"))
    assert storage.list_files(f"{root}/cache"), "no feature cache entry in the bucket"
    first, second = sorted(result["trials"], key=lambda t: t["trial_id"])
    assert first["cache_misses"][0] > 0 and second["cache_hits"][0] > 0, result["trials"]
