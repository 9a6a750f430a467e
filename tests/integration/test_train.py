"""Ray Train on a real local cluster: 2 CPU workers, checkpoints on disk and in moto's S3, recovery, resume."""

import json
import subprocess
import sys

import pytest

from sarl.platform.evaluate import evaluate_checkpoint
from sarl.platform.job import load_job
from sarl.platform.train import run_training

pytestmark = pytest.mark.integration

SMALL = ["data.options.num_images=160", "train.batch_size=16", "train.eval_batch_size=32", "train.progress=false",
         "model.rank=16"]


def job(storage_path, name, *overrides):
    return load_job("jobs/demo.yaml", [*SMALL, f"run.storage_path={storage_path}", f"run.name={name}",
                                       "train.epochs=2", *overrides])


def epochs_reported(result):
    return [int(row["epoch"]) for row in result["history"]]


def test_train_on_local_storage_and_evaluate(ray_cluster, tmp_path):
    result = run_training(job(tmp_path / "runs", "local", "train.epochs=3", "run.keep_checkpoints=1"))
    assert epochs_reported(result) == [1, 2, 3]  # every epoch, though only the best checkpoint is kept
    best = result["metrics"]
    assert best["val_mAP"] == max(row["val_mAP"] for row in result["history"])
    one = evaluate_checkpoint(result["checkpoint"], "val", output_dir=tmp_path / "eval")
    assert one["mAP"] == pytest.approx(best["val_mAP"], abs=1e-3)
    assert (tmp_path / "eval" / "per_class_ap.png").stat().st_size > 0
    two = evaluate_checkpoint(result["checkpoint"], "val", workers=2)
    assert two["mAP"] == pytest.approx(one["mAP"], abs=1e-3)
    assert two["AP"] == pytest.approx(one["AP"], abs=1e-3, nan_ok=True)
    assert two["OF1"] == pytest.approx(one["OF1"], abs=1e-3)


def test_train_with_checkpoints_in_s3(ray_cluster, s3_bucket, tmp_path):
    result = run_training(job(f"s3://{s3_bucket}/runs", "s3run"))
    assert result["checkpoint"].startswith(f"s3://{s3_bucket}/runs/s3run/")
    assert epochs_reported(result) == [1, 2]
    evaluated = evaluate_checkpoint(result["checkpoint"], "val")
    assert evaluated["mAP"] == pytest.approx(result["metrics"]["val_mAP"], abs=1e-3)


def test_worker_failure_in_epoch_2_is_recovered(ray_cluster, tmp_path):
    result = run_training(job(tmp_path / "runs", "chaos", "train.epochs=3", "run.fail_once_at_epoch=2",
                              "run.max_failures=1", "run.keep_checkpoints=5"))
    assert (tmp_path / "runs" / "chaos" / ".failed_once_at_epoch_2").exists()  # the failure did happen
    assert epochs_reported(result) == [1, 2, 3]


def test_rerun_with_the_same_name_resumes_at_the_next_epoch(ray_cluster, tmp_path):
    with pytest.raises(Exception, match="injected failure"):
        run_training(job(tmp_path / "runs", "resume", "run.fail_once_at_epoch=2", "run.max_failures=0",
                         "run.keep_checkpoints=5"))
    result = run_training(job(tmp_path / "runs", "resume", "run.keep_checkpoints=5"))
    assert epochs_reported(result) == [1, 2]  # epoch 1 from the first attempt, epoch 2 from the rerun only


@pytest.mark.parametrize("override,message", [
    ("trainn.epochs=2", "unknown key: trainn"),
    ("data.known_proportion=1.5", "data.known_proportion: 1.5 must be in (0, 1]"),
    ("loss.name=focal", "loss.name: 'focal' is not one of"),
    ("model.name=rn9000", "unknown model 'rn9000'"),
    ("run.storage_path=s3://no-such-bucket-sarl/runs", "no-such-bucket-sarl"),
])
def test_bad_input_fails_before_any_worker_starts(s3_server, override, message):
    proc = subprocess.run([sys.executable, "-m", "sarl.cli", "train", "--config", "jobs/demo.yaml", override],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_protocol_uses_the_same_mask_for_every_method_and_writes_the_table(ray_cluster, tmp_path):
    import numpy as np

    from sarl.model.data import load_mask
    from sarl.platform.protocol import run_protocol

    out = tmp_path / "protocol"
    table = run_protocol("jobs/demo.yaml", ["sarl", "global"], [0.2, 0.6], out,
                         [*SMALL, "train.epochs=2", f"run.storage_path={tmp_path / 'runs'}"])
    assert set(table) == {"sarl", "global"} and all(set(v) == {0.2, 0.6} for v in table.values())
    markdown = (out / "table.md").read_text()
    assert "validation-selected (ours)" in markdown and "test-selected (as the peers report)" in markdown
    assert markdown.count("| sarl |") == 2
    rows = (out / "table.csv").read_text().splitlines()
    assert rows[0] == "selection,method,20%,60%,avg,seeds" and len(rows) == 5
    assert (out / "map_vs_proportion.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    runs = json.loads((out / "runs.json").read_text())
    for r in runs:  # the peers' number picks the best test epoch, so it can only be higher or equal
        assert len(r["curve_test_mAP"]) == 2 and r["test_selected_mAP"] == max(r["curve_test_mAP"])
        assert r["test_selected_mAP"] >= r["test_mAP"] - 1e-3
        assert r["test_mAP"] == pytest.approx(r["curve_test_mAP"][r["best_epoch"] - 1], abs=1e-3)
    masks = {(r["method"], r["proportion"]): load_mask(f"{r['checkpoint']}/partial_labels.npz")[0] for r in runs}
    assert np.array_equal(masks["sarl", 0.2], masks["global", 0.2])
    assert np.array_equal(masks["sarl", 0.6], masks["global", 0.6])
    assert not np.array_equal(masks["sarl", 0.2], masks["sarl", 0.6])
    assert (masks["sarl", 0.2] >= 0).mean() < (masks["sarl", 0.6] >= 0).mean()
