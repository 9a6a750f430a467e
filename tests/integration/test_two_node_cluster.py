"""Training, evaluation and sweeps on a two-node cluster whose nodes share no disk (issue 10).

The head has no CPUs, so every task and Train worker runs on the worker node, which has its own /tmp and ~/.cache
(``two_node.py``): a path resolved on the driver does not exist there. Data, word vectors, checkpoints and results
live in moto's S3, which both nodes reach with the keys in their own environment.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from sarl.platform import node_cache, storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def on_worker_node(fn, *args):
    """Run ``fn(*args)`` as a 1-CPU Ray task: the head has no CPUs, so it lands on the worker node. ``fn`` is
    defined inside a test so that it travels by value (the nodes cannot import test modules)."""
    import ray

    return ray.get(ray.remote(num_cpus=1)(fn).remote(*args))


def test_the_worker_node_does_not_see_the_drivers_files(two_node_cluster, s3_server, tmp_path):
    import ray

    def probe(paths: list[str]) -> dict:
        from pathlib import Path

        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "exists": [os.path.exists(p) for p in paths],
                "endpoint": os.environ.get("AWS_ENDPOINT_URL"), "home_cache": os.listdir(Path.home() / ".cache")}

    mine = tmp_path / "written-by-the-driver.txt"
    mine.write_text("driver")
    cached = Path.home() / ".cache" / f"sarl-probe-{uuid.uuid4().hex}"
    cached.write_text("driver")
    try:
        seen = on_worker_node(probe, [str(mine), str(cached), "/work", two_node_cluster.base_dir])
    finally:
        cached.unlink()
    head = ray.get_runtime_context().get_node_id()
    assert seen["node"] != head  # the driver's node is the head
    assert seen["exists"] == [False, False, True, False]  # /tmp and ~/.cache private; the checkout is shared
    assert seen["endpoint"] == s3_server  # the node's own environment
    assert cached.name not in seen["home_cache"]


def test_preflight_checks_s3_data_exists_without_copying_it(s3_bucket, tmp_path, monkeypatch):
    """The driver checks each s3:// source with a HEAD or a one-key listing and downloads nothing (no cluster)."""
    from sarl.platform.cluster import preflight
    from sarl.platform.job import load_job
    from sarl.platform.word_vectors import UntrustedPickleError

    monkeypatch.setenv("SARL_CACHE_DIR", str(tmp_path / "cache"))
    storage.write_text(f"s3://{s3_bucket}/data/voc/a.txt", "a")
    storage.write_text(f"s3://{s3_bucket}/vec/words.kv", "not read")
    base = [f"run.storage_path=s3://{s3_bucket}/runs", "model.semantic_source=word", "data.kind=manifest"]
    preflight(load_job(None, [*base, f"data.root=s3://{s3_bucket}/data/voc"]))
    with pytest.raises(FileNotFoundError, match="data.root s3://.*/data/vo does not exist"):
        preflight(load_job(None, [*base, f"data.root=s3://{s3_bucket}/data/vo"]))
    with pytest.raises(FileNotFoundError, match="model.word_vectors"):
        preflight(load_job(None, [*base, f"data.root=s3://{s3_bucket}/data/voc",
                                  f"model.word_vectors=s3://{s3_bucket}/vec/missing.txt"]))
    monkeypatch.delenv("SARL_TRUST_PICKLED_VECTORS", raising=False)
    with pytest.raises(UntrustedPickleError):
        preflight(load_job(None, [*base, f"data.root=s3://{s3_bucket}/data/voc",
                                  f"model.word_vectors=s3://{s3_bucket}/vec/words.kv"]))
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------- data, vectors and runs on S3
CATEGORIES = ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def s3_data(two_node_cluster, s3_server, tmp_path_factory) -> dict[str, str]:
    """A small manifest data set and GloVe text vectors in a fresh bucket; the driver's node cache is a directory
    of its own (``SARL_CACHE_DIR``, the driver only: the nodes were started without it)."""
    import boto3

    from sarl.model.data import SyntheticShapes

    bucket = f"sarl-2n-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    tmp = tmp_path_factory.mktemp("s3data")
    SyntheticShapes(64, image_size=32, categories=CATEGORIES, seed=1).write_to(tmp / "shapes")
    storage.upload_dir(tmp / "shapes", f"s3://{bucket}/data/shapes")
    rng = np.random.default_rng(0)
    glove = "".join(f"{w} " + " ".join(f"{v:.4f}" for v in rng.normal(size=8)) + "\n" for w in CATEGORIES)
    storage.write_text(f"s3://{bucket}/vectors/glove.txt", glove)
    import torch

    from sarl.model import get_model_config
    from sarl.model.backbone import build_clip

    torch.manual_seed(3)  # backbone weights of its own: a file in the bucket, as a user's fine-tuned CLIP would be
    torch.save(build_clip(get_model_config("tiny").clip).state_dict(), tmp / "tiny-clip.pt")
    storage.upload_file(tmp / "tiny-clip.pt", f"s3://{bucket}/weights/tiny-clip.pt")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SARL_CACHE_DIR", str(tmp / "driver-cache"))
        yield {"bucket": bucket, "root": f"s3://{bucket}/data/shapes", "vectors": f"s3://{bucket}/vectors/glove.txt",
               "weights": f"s3://{bucket}/weights/tiny-clip.pt", "driver_cache": str(tmp / "driver-cache")}


def s3_job(data: dict[str, str], name: str, *overrides: str):
    from sarl.platform.job import load_job

    return load_job(None, ["data.kind=manifest", f"data.root={data['root']}", "data.test_split=train",
                           "data.val_fraction=0.5", "data.known_proportion=0.6", f"data.categories={CATEGORIES}",
                           "data.augment=none", "data.num_workers=0", "model.semantic_source=word",
                           f"model.word_vectors={data['vectors']}", "model.rank=16", "train.epochs=1",
                           "train.batch_size=8", "train.eval_batch_size=32", "train.progress=false",
                           f"run.storage_path=s3://{data['bucket']}/runs", f"run.name={name}", *overrides])


def worker_cache_entries() -> list[str]:
    """The URIs in the worker node's cache (its ~/.cache/sarl/s3, private to it)."""

    def entries() -> list[str]:
        import json
        from pathlib import Path

        cache = Path.home() / ".cache" / "sarl" / "s3"
        return sorted(json.loads(m.read_text())["uri"] for m in cache.glob("*/manifest.json"))

    return on_worker_node(entries)


@pytest.fixture(scope="module")
def trained(s3_data) -> dict:
    from sarl.platform.train import run_training

    return run_training(s3_job(s3_data, "twonode", "scaling.num_workers=2", f"model.pretrained={s3_data['weights']}"))


def test_training_reads_s3_data_on_the_worker_node_and_keeps_the_uris(trained, s3_data):
    """Item 1: data set, word vectors and backbone weights are copied by the worker node (not the driver); job.yaml
    and the checkpoint's model.json name the URIs, not the worker's cache paths."""
    import json

    checkpoint = trained["checkpoint"]
    assert checkpoint.startswith(f"s3://{s3_data['bucket']}/runs/twonode/")
    assert [row["epoch"] for row in trained["history"]] == [1]
    stored = yaml.safe_load(storage.read_text(storage.join(checkpoint, "job.yaml")))
    assert stored["data"]["root"] == s3_data["root"] and stored["model"]["word_vectors"] == s3_data["vectors"]
    assert stored["model"]["pretrained"] == s3_data["weights"]
    model_json = json.loads(storage.read_text(storage.join(checkpoint, "model.json")))
    assert model_json["backbone"]["pretrained"] == model_json["config"]["pretrained"] == s3_data["weights"]
    assert {s3_data["root"], s3_data["vectors"], s3_data["weights"]} <= set(worker_cache_entries())
    assert not Path(s3_data["driver_cache"]).exists()  # the driver downloaded nothing


def test_evaluation_runs_on_the_worker_node_with_one_or_two_workers(trained, s3_data, two_node_cluster):
    """Item 2: evaluate_checkpoint(s3 URI) on the cluster's workers; one and two shards give the same numbers."""
    import ray

    from sarl.platform.evaluate import evaluate_checkpoint

    one = evaluate_checkpoint(trained["checkpoint"], "val", workers=1)
    two = evaluate_checkpoint(trained["checkpoint"], "val", workers=2)
    assert one["mAP"] == pytest.approx(trained["metrics"]["val_mAP"], abs=1e-3)
    assert two["mAP"] == pytest.approx(one["mAP"], abs=1e-3)
    assert two["AP"] == pytest.approx(one["AP"], abs=1e-3, nan_ok=True)
    assert two["OF1"] == pytest.approx(one["OF1"], abs=1e-3) and two["num_images"] == one["num_images"]
    worker = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    assert [w["rank"] for w in two["evaluated_on"]] == [0, 1]
    assert [w["node"] for w in one["evaluated_on"] + two["evaluated_on"]] == worker * 3  # not the driver's (head)
    assert trained["checkpoint"].rstrip("/") in {u.rstrip("/") for u in worker_cache_entries()}
    assert not Path(s3_data["driver_cache"]).exists()  # only the checkpoint's job.yaml was read here


def test_bulk_prediction_runs_on_the_worker_node_from_an_s3_manifest(trained, s3_data):
    """``sarl predict`` with checkpoint, manifest and output on S3: the actors on the worker node copy the weights
    and read the images; the driver reads the manifest and the checkpoint's small files and keeps nothing."""
    from sarl.platform.predict import PredictConfig, read_rows, run_predict

    checkpoint, output = trained["checkpoint"], f"s3://{s3_data['bucket']}/predicted/twonode"
    summary = run_predict(PredictConfig(checkpoint=checkpoint, input=f"{s3_data['root']}/manifest.jsonl",
                                        output=output, batch_size=16))
    rows = read_rows(output)
    expected = sorted(storage.join(s3_data["root"], "images", f) for f in storage.list_files(
        f"{s3_data['root']}/images"))
    assert len(expected) == 64 and sorted(r["path"] for r in rows) == expected  # each image once
    assert summary["written"] == 64 and summary["errors"] == 0
    digest = storage.read_text(storage.join(checkpoint, "digest.txt")).strip()
    assert {r["model_digest"] for r in rows} == {digest} and summary["model"]["digest"] == digest
    assert all(len(r["scores"]) == len(CATEGORIES) for r in rows)
    assert checkpoint.rstrip("/") in {u.rstrip("/") for u in worker_cache_entries()}  # the actor's copy
    assert not Path(s3_data["driver_cache"]).exists()  # the driver copied no weights and no manifest


def test_calibration_scores_on_the_worker_node_and_pushes_to_an_s3_store(trained, s3_data):
    """``sarl calibrate`` scores val and test as Ray tasks on the worker node (one or two shards pick the same
    thresholds) and pushes the version to a store on S3; the driver copies nothing."""
    from sarl.platform.complete import run_calibrate
    from sarl.platform.vocab_store import VocabStore

    store = VocabStore(f"s3://{s3_data['bucket']}/vocab-calibrated")
    one = run_calibrate(trained["checkpoint"], store.uri, version="one-shard", min_positives=1, workers=1)
    two = run_calibrate(trained["checkpoint"], store.uri, version="two-shards", min_positives=1, workers=2)
    assert any(c["calibrated"] for c in two["categories"])
    assert [c["threshold"] for c in two["categories"]] == pytest.approx([c["threshold"] for c in one["categories"]])
    for when in ("before", "after"):
        assert two["test"][when] == pytest.approx(one["test"][when])
    pushed = store.load()
    assert store.current_version() == pushed.version == "two-shards"
    assert [c.threshold for c in pushed.categories] == pytest.approx([c["threshold"] for c in two["categories"]])
    assert not Path(s3_data["driver_cache"]).exists()


def test_a_sweep_trains_on_s3_data_on_the_worker_node_and_a_stopped_trial_frees_its_resources(s3_data, tmp_path):
    """Item 1 for Tune: a trial's workers copy the data themselves (the trial driver's node is not theirs).

    Issue 18, 7b: ASHA stops the second trial (learning rate 1e-9: no better than its initial weights at the rung,
    epoch 1, of 8) while Train runs; its controller dies with the trial, and Train's detached cleaner must remove
    the placement group, through the State API, which it reaches at the address the job gives it. Before, a
    stopped trial's placement group (and its CPUs) stayed until the driver ended and the cleaner spun forever.
    Epochs last about 0.2 s here, and Train goes on while Tune decides: with 2 epochs, a busy machine could let the
    stopped trial's Train run finish first (and its controller free the group itself); 8 leave it seven to go when
    the stop lands, for about a second more of the first trial."""
    import ray
    from ray.util import placement_group_table

    from sarl.model.config import from_dict, to_dict
    from sarl.platform.runs import Run
    from sarl.platform.tune import SweepConfig, run_sweep

    sweep = from_dict(SweepConfig, {"name": "sweep2n", "space": {"optim.lr": {"grid": [0.01, 1e-9]}},
                                    "num_samples": 1, "max_concurrent_trials": 1,
                                    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
                                    "resources": {"num_workers": 1, "cpus_per_worker": 1.0},
                                    "storage_path": f"s3://{s3_data['bucket']}/tune",
                                    "output_dir": str(tmp_path / "results")})
    epochs = 8
    result = run_sweep(sweep, to_dict(s3_job(s3_data, "unused", "scaling.num_workers=1", f"train.epochs={epochs}")))
    assert [t["status"] for t in result["trials"]] == ["completed", "stopped early"], result["trials"]
    completed, stopped = result["trials"]
    # "stopped early" is Tune's view (its last epoch); the epochs are those Train committed. A Train run that ended
    # before the stop landed would have all of them, and its controller shut down and removed its group itself.
    assert completed["epochs"] == epochs and stopped["epochs"] < epochs, result["trials"]
    assert not Path(s3_data["driver_cache"]).exists()
    rows = Run(storage.join(sweep.storage_path, sweep.name, "train"), completed["trial_id"]).history()
    print(f"epochs trained {[t['epochs'] for t in result['trials']]} of {epochs}; the completed trial's epoch "
          f"seconds {[round(r['epoch_seconds'], 1) for r in rows]}")

    def held() -> tuple[list[str], float]:
        live = [pg for pg, row in placement_group_table().items() if row["state"] != "REMOVED"]
        return live, ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0.0)

    deadline = time.monotonic() + 30  # the cleaner looks once a second
    while held() != ([], 0.0) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert held() == ([], 0.0), held()


# ------------------------------------------------------------------------------------------- fault injection
FAULT_EPOCHS = 3


@pytest.fixture(scope="module")
def fault_data(s3_data, tmp_path_factory) -> dict[str, str]:
    """The same kind of data set, large enough that an epoch of two workers lasts seconds (a kill lands inside
    one), in the same bucket."""
    from sarl.model.data import SyntheticShapes

    tmp = tmp_path_factory.mktemp("faultdata")
    SyntheticShapes(960, image_size=32, categories=CATEGORIES, seed=2).write_to(tmp / "shapes")
    root = f"s3://{s3_data['bucket']}/data/shapes960"
    storage.upload_dir(tmp / "shapes", root)
    return {**s3_data, "root": root}


def fault_job(data: dict[str, str], name: str, *overrides: str):
    # Batches of 4 (60 steps an epoch): epoch 2 trains for seconds after Train commits epoch 1's checkpoint.
    return s3_job(data, name, "scaling.num_workers=2", f"train.epochs={FAULT_EPOCHS}", "run.keep_checkpoints=5",
                  "run.max_failures=2", "train.batch_size=4", *overrides)


def raw_history(data: dict[str, str], name: str) -> list[dict]:
    """Every row the run wrote to its history.jsonl, repeats included."""
    import json

    text = storage.read_text(f"s3://{data['bucket']}/runs/{name}/history.jsonl")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def checkpoint_dirs(data: dict[str, str], name: str) -> dict[str, set[str]]:
    """Each checkpoint directory the run left in storage -> the files in it."""
    found: dict[str, set[str]] = {}
    for relative in storage.list_files(f"s3://{data['bucket']}/runs/{name}"):
        if relative.startswith("checkpoint_") and "/" in relative:
            directory, file = relative.split("/", 1)
            found.setdefault(directory, set()).add(file)
    return found


def train_worker_pids(cluster) -> list[int]:
    """The Train worker processes of the worker node: descendants of its `ray start` only (other Ray instances
    on this machine have workers of their own). Ray sets their process title to ``ray::RayTrainWorker...``."""
    import two_node

    pids = []
    for pid in two_node._descendants(cluster.pids["worker"]):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::RayTrainWorker"):
            pids.append(pid)
    return pids


@pytest.fixture(scope="module")
def uninterrupted(fault_data) -> list[dict]:
    from sarl.platform.train import run_training

    run_training(fault_job(fault_data, "fault-reference"))
    return raw_history(fault_data, "fault-reference")


def test_a_training_worker_killed_mid_epoch_resumes_from_its_checkpoint(fault_data, uninterrupted,
                                                                       two_node_cluster):
    """SIGKILL of one of the two Train workers during epoch 2: Train restarts the group from epoch 1's checkpoint;
    the raw history has each epoch once, epoch 2 started after the kill, and the metrics are the uninterrupted
    run's (same seeds; per-rank RNG and the optimizer state come back from the checkpoint)."""
    import signal
    import threading
    import time

    from sarl.platform.runs import Run
    from sarl.platform.train import run_training

    job, outcome = fault_job(fault_data, "killed"), {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_training(job)), daemon=True)
    thread.start()
    deadline, killed_at, victims = time.monotonic() + 300, None, []
    while killed_at is None and time.monotonic() < deadline and thread.is_alive():
        victims = victims or train_worker_pids(two_node_cluster)  # before epoch 1 ends: nothing to wait on later
        # Train has committed epoch 1's checkpoint and not yet epoch 2's: epoch 2 is under way, and a restart
        # resumes from epoch 1. (Its history row comes earlier, once the upload is done; Train's snapshot lags it
        # by its poll of the workers, about 2 s, so waiting for the row as well could miss a short epoch 2.)
        latest = Run.of(job).latest_checkpoint() if victims else None
        if latest is not None and latest[1].get("epoch") == 1:
            os.kill(victims[0], signal.SIGKILL)
            killed_at = time.time()
        time.sleep(0.1)
    victim = victims[0] if victims else None
    thread.join(timeout=600)
    assert killed_at is not None, "Train never committed epoch 1's checkpoint"
    assert "result" in outcome, "the run did not finish after the kill"
    rows = raw_history(fault_data, "killed")
    assert [r["epoch"] for r in rows] == list(range(1, FAULT_EPOCHS + 1))  # as written: each epoch once
    assert rows[0]["started_at"] < killed_at < rows[1]["started_at"]  # epoch 1 kept, epoch 2 run again
    assert victim not in train_worker_pids(two_node_cluster)
    for mine, reference in zip(rows, uninterrupted, strict=True):
        assert mine["loss"] == pytest.approx(reference["loss"], abs=1e-4)
        assert mine["val_mAP"] == pytest.approx(reference["val_mAP"], abs=1e-2)
    print(f"epoch seconds {[round(r['epoch_seconds'], 1) for r in rows]}; killed pid {victim} "
          f"{killed_at - rows[0]['started_at'] - rows[0]['epoch_seconds']:.1f} s after epoch 1 ended; |d loss| "
          f"{[abs(a['loss'] - b['loss']) for a, b in zip(rows, uninterrupted)]}, |d val mAP| "
          f"{[abs(a['val_mAP'] - b['val_mAP']) for a, b in zip(rows, uninterrupted)]}")


def test_the_s3_endpoint_stopped_during_a_checkpoint_upload(fault_data, s3_outage, monkeypatch):
    """The endpoint answers the first PUT of epoch 2's train_state.pt with a 503 and is down for OUTAGE_S: the
    upload retries past the outage and the run finishes; every checkpoint in storage is whole and loads."""
    from moto.s3.responses import S3Response

    from sarl.model.checkpoint import load_checkpoint
    from sarl.platform.train import run_training

    outage_s, puts = 6.0, []
    original = S3Response.key_response

    def failing(self, request, full_url, headers):
        path = full_url.split("?")[0]
        if request.method == "PUT" and "/runs/outage/checkpoint_" in path and path.endswith("/train_state.pt"):
            puts.append(path)
            if len(puts) == 2:  # epoch 2's: the store goes away mid-upload
                s3_outage.for_seconds(outage_s)
                return 503, {}, b"<Error><Code>ServiceUnavailable</Code></Error>"
        return original(self, request, full_url, headers)

    monkeypatch.setattr(S3Response, "key_response", failing)
    result = run_training(fault_job(fault_data, "outage"))
    assert len(s3_outage.outages) == 1 and s3_outage.outages[0][1] - s3_outage.outages[0][0] >= outage_s
    assert [r["epoch"] for r in raw_history(fault_data, "outage")] == list(range(1, FAULT_EPOCHS + 1))
    dirs = checkpoint_dirs(fault_data, "outage")
    assert len(dirs) == FAULT_EPOCHS and len({frozenset(files) for files in dirs.values()}) == 1, dirs
    for directory in dirs:
        model = load_checkpoint(node_cache.local_copy(f"s3://{fault_data['bucket']}/runs/outage/{directory}"))
        assert model.vocabulary.names == CATEGORIES
    assert result["checkpoint"].rsplit("/", 1)[-1] in dirs
    stopped, started = s3_outage.outages[0]
    rows = raw_history(fault_data, "outage")
    starts = [round(r["started_at"] - stopped, 1) for r in rows]
    uploads = [round(r["checkpoint_upload_s"], 1) for r in rows]
    print(f"outage {started - stopped:.1f} s; epochs started at {starts} s from it, checkpoint uploads {uploads} s")
