"""``sarl evaluate``: metrics of a checkpoint on its run's validation or test split, in files and a plot.

The checkpoint carries its resolved job and partial-label mask, so the validation split is rebuilt exactly as
training saw it. With ``workers > 1`` the evaluation runs data-parallel on Ray (each worker scores a disjoint
shard; torchmetrics gathers them), which gives the same numbers as one process.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..model import engine
from ..model.checkpoint import load_checkpoint
from ..model.config import ConfigError, from_dict, load_yaml, merge, parse_overrides, to_dict
from ..model.experiment import make_loader, prepare_data
from ..model.metrics import MultiLabelMetrics
from ..plots import per_class_ap
from . import storage
from .job import JobConfig
from .train import JOB_FILE, init_ray, shard


def checkpoint_job(ckpt_dir: Path, overrides: list[str] = ()) -> JobConfig:
    """The job a checkpoint was trained with, with ``key=value`` overrides (e.g. ``data.root=...``)."""
    path = ckpt_dir / JOB_FILE
    if not path.is_file():
        raise ConfigError(f"{ckpt_dir} has no {JOB_FILE}: not a checkpoint written by sarl train")
    return from_dict(JobConfig, merge(load_yaml(path), parse_overrides(overrides)))


def _split(job: JobConfig, ckpt_dir: Path, split: str):
    splits = prepare_data(job, ckpt_dir)  # loads the checkpoint's mask
    if split == "val":
        if splits.val is None:
            raise ConfigError("the job has no validation split (data.val_fraction=0)")
        return splits.val, splits.categories
    if split == "test":
        return splits.test, splits.categories
    raise ConfigError(f"split must be val or test, not {split!r}")


def chance_map(labels) -> float:
    """Expected mAP of random scores: per class, the positive rate among known entries (in percent)."""
    known = labels >= 0
    rates = (labels == 1).sum(0) / known.sum(0).clip(min=1)
    return float(100 * rates[(labels == 1).any(0)].mean())


def _evaluate_local(ckpt_dir: Path, job: JobConfig, split: str, rank: int = 0, world: int = 1,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    dataset, categories = _split(job, ckpt_dir, split)
    model = load_checkpoint(ckpt_dir, map_location=device, resolve=storage.local_copy)  # s3:// weights source
    loader = make_loader(shard(dataset, rank, world), job.train.eval_batch_size, False, job.data.num_workers)
    metrics = MultiLabelMetrics(len(categories)).to(device)
    result = engine.evaluate(model, loader, device, metrics=metrics, amp=job.train.amp,
                             progress=job.train.progress and rank == 0, desc=f"evaluate {split}")
    result["categories"] = categories
    result["num_images"] = len(dataset)
    result["chance_mAP"] = chance_map(dataset.labels)
    return result


def _eval_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    ckpt_dir = Path(storage.local_copy(config["checkpoint"]))
    job = from_dict(JobConfig, config["job"])
    rank = ctx.get_world_rank()
    result = _evaluate_local(ckpt_dir, job, config["split"], rank, ctx.get_world_size(), ray.train.torch.get_device())
    # Train V2 keeps reported metrics with checkpoints only, so rank 0 returns them as a one-file checkpoint.
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            (Path(tmp) / "evaluation.json").write_text(json.dumps(result))
        ray.train.report({"mAP": result["mAP"]}, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0
                         else None)


def evaluate_checkpoint(uri: str, split: str = "val", overrides: list[str] = (), workers: int = 1,
                        output_dir: str | Path | None = None, address: str | None = None) -> dict[str, Any]:
    """Evaluate checkpoint ``uri`` (local or s3://); writes metrics.json, per_class_ap.csv/.png to output_dir."""
    ckpt_dir = Path(storage.local_copy(uri))
    job = checkpoint_job(ckpt_dir, list(overrides))
    if workers <= 1:
        result = _evaluate_local(ckpt_dir, job, split)
    else:
        import ray.train
        from ray.train.torch import TorchTrainer

        init_ray(address or job.address)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = TorchTrainer(
                _eval_loop_per_worker,
                train_loop_config={"checkpoint": str(uri), "job": to_dict(job), "split": split},
                scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=job.scaling.use_gpu),
                run_config=ray.train.RunConfig(name="evaluate", storage_path=tmp))
            outcome = trainer.fit()
            if outcome.error:
                raise outcome.error
            with outcome.checkpoint.as_directory() as out:
                result = json.loads((Path(out) / "evaluation.json").read_text())
    result["checkpoint"] = str(uri)
    result["split"] = split
    if output_dir is not None:
        write_reports(result, Path(output_dir))
    return result


def write_reports(result: dict[str, Any], output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k not in ("AP", "logits", "targets")}
    (output_dir / "metrics.json").write_text(json.dumps({**summary, "AP": result["AP"]}, indent=2))
    with open(output_dir / "per_class_ap.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["category", "AP"])
        writer.writerows(zip(result["categories"], result["AP"]))
    per_class_ap(output_dir / "per_class_ap.png", result["categories"], {"checkpoint": result["AP"]},
                 title=f"Per-class AP ({result['split']}, {result.get('num_images', '?')} images)")


def format_metrics(result: dict[str, Any]) -> str:
    lines = [f"{result['split']} split, {result.get('num_images', '?')} images",
             f"mAP {result['mAP']:.2f}   CF1 {result['CF1']:.2f}   OF1 {result['OF1']:.2f}   "
             f"CF1@top3 {result['CF1_top3']:.2f}   OF1@top3 {result['OF1_top3']:.2f}", "per-class AP:"]
    lines += [f"  {name:<24} {ap:6.2f}" for name, ap in zip(result["categories"], result["AP"])]
    return "\n".join(lines)
