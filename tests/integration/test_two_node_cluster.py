"""Training, evaluation and sweeps on a two-node cluster whose nodes share no disk (issue 10).

The head has no CPUs, so every task and Train worker runs on the worker node, which has its own /tmp and ~/.cache
(``two_node.py``): a path resolved on the driver does not exist there. Data, word vectors, checkpoints and results
live in moto's S3, which both nodes reach with the keys in their own environment.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from sarl.platform import storage

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
    from sarl.platform.job import load_job
    from sarl.platform.train import preflight
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
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SARL_CACHE_DIR", str(tmp / "driver-cache"))
        yield {"bucket": bucket, "root": f"s3://{bucket}/data/shapes", "vectors": f"s3://{bucket}/vectors/glove.txt",
               "driver_cache": str(tmp / "driver-cache")}


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

    return run_training(s3_job(s3_data, "twonode", "scaling.num_workers=2"))


def test_training_reads_s3_data_on_the_worker_node_and_keeps_the_uris(trained, s3_data):
    """Item 1: data set and word vectors are copied by the worker node (not the driver); job.yaml names the URIs."""
    checkpoint = trained["checkpoint"]
    assert checkpoint.startswith(f"s3://{s3_data['bucket']}/runs/twonode/")
    assert [row["epoch"] for row in trained["history"]] == [1]
    stored = yaml.safe_load(storage.read_text(storage.join(checkpoint, "job.yaml")))
    assert stored["data"]["root"] == s3_data["root"] and stored["model"]["word_vectors"] == s3_data["vectors"]
    assert {s3_data["root"], s3_data["vectors"]} <= set(worker_cache_entries())
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


def test_a_sweep_trains_on_s3_data_on_the_worker_node(s3_data, tmp_path):
    """Item 1 for Tune: a trial's workers copy the data themselves (the trial driver's node is not theirs)."""
    from sarl.model.config import from_dict, to_dict
    from sarl.platform.tune import SweepConfig, run_sweep

    sweep = from_dict(SweepConfig, {"name": "sweep2n", "space": {"loss.name": {"grid": ["asl"]}}, "num_samples": 1,
                                    "max_concurrent_trials": 1, "scheduler": {"name": "none"},
                                    "resources": {"num_workers": 1, "cpus_per_worker": 1.0},
                                    "storage_path": f"s3://{s3_data['bucket']}/tune",
                                    "output_dir": str(tmp_path / "results")})
    result = run_sweep(sweep, to_dict(s3_job(s3_data, "unused", "scaling.num_workers=1")))
    assert [t["status"] for t in result["trials"]] == ["completed"], result["trials"]
    assert not Path(s3_data["driver_cache"]).exists()
