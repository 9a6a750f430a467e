"""``sarl predict`` on the real local cluster: a folder of generated images with corrupt files and the cards_voc
photos, given by relative paths, with scores equal to ``/v1/predict``'s; an S3 prefix in moto's bucket with the
output written back to S3; a run killed part-way then rerun (no duplicate row, no missing one); and GPU actors on a
cluster whose autoscaler declares GPU nodes it has not started."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import requests
import torch
from PIL import Image

from sarl.model import Category, Vocabulary, create_model
from sarl.model.checkpoint import checkpoint_digest, export_checkpoint, save_checkpoint
from sarl.platform import storage
from sarl.platform.predict import PredictConfig, read_rows, run_predict

from serving import CARDS

pytestmark = pytest.mark.integration

CORRUPT = {"truncated.jpg": "cannot decode", "text.jpg": "cannot decode", "empty.png": "empty"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    model = create_model("tiny", Vocabulary([Category(n) for n in CARDS], version="trained"))
    return save_checkpoint(model, tmp_path_factory.mktemp("predict") / "checkpoint", extra={"epoch": 7})


def make_folder(root: Path, n: int, cards: Path | None = None) -> tuple[list[Path], list[Path]]:
    """``n`` generated PNGs in two subfolders, the corrupt files, and (if given) 4 cards_voc photos."""
    good = []
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"sub{i % 2}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        good.append(path)
    if cards is not None:
        for photo in sorted((cards / "test").glob("*.JPG"))[:4]:
            good.append(Path(shutil.copy(photo, root / photo.name)))
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    (root / "text.jpg").write_text("not an image at all\n")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image suffix: not listed\n")
    return good, [root / name for name in CORRUPT]


def read_errors(output: str) -> list[dict]:
    return [json.loads(line) for name in storage.list_dir(output) if name.startswith("errors-")
            for line in storage.read_text(storage.join(output, name)).splitlines() if line]


def test_a_folder_with_corrupt_files_and_real_photos_scores_as_serve_does(local_app, cards_voc, tmp_path,
                                                                          monkeypatch):
    """Against the session's Serve app: the same checkpoint and store, so the same version's scores and labels.

    Issue 18: every path is relative to the caller's directory, which is not the actors' (item 3: they got the
    relative checkpoint and store as given and failed); the decode tasks ask for other CPUs than the actor (2: one
    task at a time, one process more), so the two stages stay apart and the uint8 images travel through the object
    store to be normalised in the actor, as they travel to GPU actors (item 9)."""
    good, corrupt = make_folder(tmp_path / "images", 20, cards_voc)
    output = str(tmp_path / "out")
    version = local_app.store.current_version()
    monkeypatch.delenv("SARL_BASE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    summary = run_predict(PredictConfig(checkpoint=os.path.relpath(local_app.checkpoint), input="images",
                                        output="out", vocab_store=os.path.relpath(local_app.store.uri),
                                        format="jsonl", batch_size=8, shard_size=10, decode_cpus=2))
    rows = read_rows(output, "jsonl")
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in good)
    errors = {Path(e["path"]).name: e["reason"] for e in read_errors(output)}
    assert set(errors) == set(CORRUPT)
    for name, words in CORRUPT.items():
        assert words in errors[name], (name, errors[name])
    assert summary["images"] == len(good) + len(corrupt) and summary["written"] == len(good)
    assert summary["errors"] == len(corrupt) and summary["this_run"]["images_per_s"] > 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["written"] == len(good)
    assert summary["output"] == str((tmp_path / "out").resolve())  # where the caller's directory says
    digest = checkpoint_digest(local_app.checkpoint)
    assert {(r["model_id"], r["model_digest"], r["vocabulary_version"]) for r in rows} == {
        ("checkpoint:epoch-7", digest, version)}
    thresholds = {c.name: c.threshold for c in local_app.store.load(version).categories}
    by_path = {r["path"]: r for r in rows}
    for path in [good[0], good[7], *good[-4:]]:  # generated images and the photos
        served = requests.post(f"{local_app.url}/v1/predict", data=path.read_bytes(), params={"threshold": 0.0},
                               headers={"Content-Type": "application/octet-stream"}, timeout=30).json()
        assert served["vocabulary_version"] == version
        # Both rounded to 6 decimals; a batch of 8 and a batch of 1 may round the last one apart.
        assert by_path[str(path)]["scores"] == pytest.approx(served["scores"], abs=1.01e-6), path.name
        assert sorted(by_path[str(path)]["labels"]) == sorted(n for n, p in served["scores"].items()
                                                              if p >= thresholds[n])


def test_an_s3_prefix_in_and_parquet_out_to_s3_with_an_export(ray_cluster, s3_bucket, s3_server, tmp_path):
    """An S3 prefix in, Parquet out to S3, with the model given as a ``sarl export`` output, made where the CLIP
    weights were and scored where they are not (issue 18, 1: every scoring actor refused the export, whose
    digest.txt had been overwritten with the source's)."""
    from sarl.model.backbone import build_clip
    from sarl.model.factory import get_model_config

    weights = tmp_path / "clip-weights.pt"  # a weights source: the run's checkpoint stores only what trained
    torch.save(build_clip(get_model_config("tiny-rn").clip).state_dict(), weights)
    vocabulary = Vocabulary([Category(n) for n in CARDS], version="trained")
    model = create_model("tiny-rn", vocabulary, pretrained=str(weights))
    source = save_checkpoint(model, tmp_path / "run-checkpoint", extra={"epoch": 7})
    export = export_checkpoint(source, tmp_path / "export")
    weights.unlink()  # gone, as where the export is served: only the export loads now
    good, corrupt = make_folder(tmp_path / "images", 12)
    client = boto3.client("s3", endpoint_url=s3_server)
    for path in [*good, *corrupt]:
        client.put_object(Bucket=s3_bucket, Key=f"photos/{path.relative_to(tmp_path / 'images').as_posix()}",
                          Body=path.read_bytes())
    output = f"s3://{s3_bucket}/labelled"
    summary = run_predict(PredictConfig(checkpoint=str(export), input=f"s3://{s3_bucket}/photos",
                                        output=output, batch_size=4, shard_size=5, actors=1))
    rows = read_rows(output, "parquet")
    expected = {f"s3://{s3_bucket}/photos/{p.relative_to(tmp_path / 'images').as_posix()}" for p in good}
    assert sorted(r["path"] for r in rows) == sorted(expected) and len(rows) == len(expected)
    assert {Path(e["path"]).name for e in read_errors(output)} == set(CORRUPT)
    assert rows[0]["vocabulary_version"] == "trained" and set(rows[0]["scores"]) == set(CARDS)
    assert {(r["model_id"], r["model_digest"]) for r in rows} == {("export:epoch-7", checkpoint_digest(export))}
    assert summary["written"] == len(good) and storage.exists(f"{output}/summary.json")


def test_a_run_killed_part_way_then_rerun_writes_every_image_once(ray_cluster, checkpoint, tmp_path):
    import ray

    good, corrupt = make_folder(tmp_path / "images", 150)
    output = tmp_path / "out"
    args = [str(Path(sys.executable).parent / "sarl"), "predict", "--checkpoint", str(checkpoint),
            "--input", str(tmp_path / "images"), "--output", str(output), "--format", "jsonl",
            "--batch-size", "4", "--shard-size", "8", "--address", ray.get_runtime_context().gcs_address]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(output.glob("part-*.jsonl"))) < 2:
            assert first.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    before = read_rows(str(output), "jsonl")
    assert 0 < len(before) < len(good), len(before)  # killed part-way
    summary = run_predict(PredictConfig(checkpoint=str(checkpoint), input=str(tmp_path / "images"),
                                        output=str(output), format="jsonl", batch_size=8, shard_size=16))
    rows = read_rows(str(output), "jsonl")
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == len(good)  # no duplicate, none missing
    assert set(paths) == {str(p) for p in good}
    assert sorted(Path(e["path"]).name for e in read_errors(str(output))) == sorted(CORRUPT)
    assert summary["skipped_already_written"] >= len(before)
    # --overwrite starts over
    again = run_predict(PredictConfig(checkpoint=str(checkpoint), input=str(tmp_path / "images"),
                                      output=str(output), format="jsonl", overwrite=True, shard_size=200))
    assert again["this_run"]["scored"] == len(good) and len(read_rows(str(output), "jsonl")) == len(good)


def test_gpu_actors_on_a_cluster_whose_autoscaler_declares_gpu_nodes(ray_cluster):
    """Issue 18, item 9: GPU nodes that scale from zero are not in ``cluster_resources()`` when a run starts; the
    node types the autoscaler reports to the GCS (its cluster config, sent here as an autoscaler sends it) are."""
    import ray
    from ray.core.generated import autoscaler_pb2

    from sarl.platform.predict import stage_resources

    config = PredictConfig(checkpoint="c", input="i", output="o")
    declared = autoscaler_pb2.ClusterConfig()
    group = declared.node_group_configs.add(name="gpu-workers", min_count=0, max_count=4)
    group.resources.update({"CPU": 8, "GPU": 1})
    gcs = ray._private.worker.global_worker.gcs_client
    assert not ray.cluster_resources().get("GPU")
    gcs.report_cluster_config(declared.SerializeToString())
    try:
        decode_cpus, actors = stage_resources(config, 100)
    finally:
        gcs.report_cluster_config(autoscaler_pb2.ClusterConfig().SerializeToString())  # none declared again
    assert (decode_cpus, actors["num_gpus"], actors["num_cpus"]) == (1.0, 1.0, 0.0)  # decoding on the CPUs
    decode_cpus, actors = stage_resources(config, 100)  # no GPU to find: CPU actors, decoding their own images
    assert (decode_cpus, actors["num_gpus"], actors["num_cpus"]) == (1.0, 0.0, 1.0)
