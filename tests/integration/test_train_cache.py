"""``sarl train`` from the feature cache on a real local Ray cluster, its root in moto's S3 (a local root is the
same code without the upload: tests/unit/model/test_experiment.py and test_features.py train from one)."""

import shutil

import pytest

from sarl.platform import storage
from sarl.platform.feature_store import local_mirror
from sarl.platform.job import load_job
from sarl.platform.train import run_training

pytestmark = pytest.mark.integration

SMALL = ["data.options.num_images=96", "train.batch_size=16", "train.eval_batch_size=48", "train.progress=false",
         "model.rank=16", "model.unfreeze=none", "scaling.num_workers=1", "train.epochs=1", "cache.enabled=true"]


def job(tmp_path, name, cache_root, *overrides):
    return load_job("jobs/demo.yaml", [*SMALL, f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}",
                                       f"cache.root={cache_root}", *overrides])


def cache_counts(result):
    row = result["history"][-1]
    return row["cache_hits"], row["cache_misses"]


def test_two_workers_share_a_feature_cache_in_s3_and_a_fresh_machine_hits_it(ray_cluster, s3_bucket, tmp_path):
    """Two workers compute the entry together (a block of images each) and upload it; with this machine's mirror
    gone (a fresh machine: only S3 has the entry) the next run's two workers both hit it, downloaded once."""
    root = f"s3://{s3_bucket}/features"
    mirror = local_mirror(root)
    try:
        first = run_training(job(tmp_path, "first", root, "scaling.num_workers=2"))
        assert cache_counts(first) == (0, 1)  # one entry: the training split, shared by train and validation
        assert first["metrics"]["cache_misses"] == 1  # in the metrics Tune and `sarl train` see
        entries = storage.list_dir(root)
        assert len(entries) == 1
        assert set(storage.list_dir(storage.join(root, entries[0]))) == {"dense.npy", "global.npy", "valid.npy",
                                                                         "meta.json"}
        shutil.rmtree(mirror)
        second = run_training(job(tmp_path, "second", root, "scaling.num_workers=2"))
        assert cache_counts(second) == (1, 0)
        assert second["metrics"]["val_mAP"] == pytest.approx(first["metrics"]["val_mAP"], abs=1e-4)
        assert (mirror / entries[0] / "meta.json").is_file()  # downloaded into this machine's mirror
    finally:
        shutil.rmtree(mirror, ignore_errors=True)
