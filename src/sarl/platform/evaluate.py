"""``sarl evaluate``: metrics of a checkpoint on its run's validation or test split, in files and a plot.

The checkpoint carries its job (with the data set's URI, not a node's copy of it) and partial-label mask, so the
validation split is rebuilt exactly as training saw it, on any machine.

Where it runs: on a Ray cluster's workers when there is one (this process is connected to one, or one is named by
``address``, the job's ``address`` or ``$RAY_ADDRESS``; ``workers > 1`` starts a local one otherwise). ``workers``
Ray tasks, each with the resources of one training worker of the job (its GPU when it trained on GPUs), score
disjoint shards; each node copies the checkpoint and an ``s3://`` data set into its own cache once. The shards'
logits and targets come back through Ray and the metrics are computed over all of them here, so any number of
workers gives the numbers of one. Without a cluster (``on_cluster=False``, or none connected or named) it scores
in this process on its CPU.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..model import engine
from ..model.checkpoint import load_checkpoint
from ..model.config import ConfigError, from_dict, merge, parse_overrides, to_dict
from ..model.distributed import shard
from ..model.experiment import make_loader, prepare_data
from ..model.metrics import MultiLabelMetrics
from . import node_cache, storage
from .cluster import connected_or_named, init_ray, resolve_data_uris, task_options
from .job import JobConfig
from .runs import JOB_FILE


def checkpoint_job(checkpoint: str | Path, overrides: list[str] = ()) -> JobConfig:
    """The job a checkpoint (a local directory or ``s3://`` prefix) was trained with, with ``key=value`` overrides
    (e.g. ``data.root=...``); only its ``job.yaml`` is read."""
    path = storage.join(str(checkpoint), JOB_FILE)
    if not storage.exists(path):
        raise ConfigError(f"{checkpoint} has no {JOB_FILE}: not a checkpoint written by sarl train")
    stored = yaml.safe_load(storage.read_text(path)) or {}
    if not isinstance(stored, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(JobConfig, merge(stored, parse_overrides(overrides)))


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


def score_shard(ckpt_dir: Path, job: JobConfig, split: str, rank: int = 0, world: int = 1,
                device: torch.device | str = "cpu") -> dict[str, Any]:
    """Logits and targets of shard ``rank`` of ``world`` of the split, and what every shard knows of the whole
    split (categories, size, chance mAP). The data set is this node's copy of an ``s3://`` one."""
    job = resolve_data_uris(job, model_files=False)  # the checkpoint holds the semantics: no word vectors
    dataset, categories = _split(job, ckpt_dir, split)
    model = load_checkpoint(ckpt_dir, map_location=device, resolve=node_cache.local_copy)  # s3:// weights source
    loader = make_loader(shard(dataset, rank, world), job.train.eval_batch_size, False, job.data.num_workers)
    out = engine.evaluate(model, loader, device, num_classes=len(categories), amp=job.train.amp,
                          progress=job.train.progress and rank == 0, desc=f"evaluate {split}", return_outputs=True)
    return {"logits": out["logits"].numpy(), "targets": out["targets"].numpy(), "skipped_images":
            out["skipped_images"], "categories": categories, "num_images": len(dataset),
            "chance_mAP": chance_map(dataset.labels)}


def merge_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics over every shard's logits and targets (what one process scoring the whole split gives)."""
    first = shards[0]
    scored = [s for s in shards if len(s["logits"])]
    metrics = MultiLabelMetrics(len(first["categories"]))
    metrics.update(torch.from_numpy(np.concatenate([s["logits"] for s in scored])),
                   torch.from_numpy(np.concatenate([s["targets"] for s in scored])))
    result = {k: (v.tolist() if torch.is_tensor(v) and v.numel() > 1 else float(v))
              for k, v in metrics.compute().items()}
    result.update(skipped_images=sum(s["skipped_images"] for s in shards), categories=first["categories"],
                  num_images=first["num_images"], chance_mAP=first["chance_mAP"])
    return result


def _evaluate_task(uri: str, job: dict[str, Any], split: str, rank: int, world: int) -> dict[str, Any]:
    """One shard as a Ray task, on whichever node Ray placed it (``uri``: absolute path or ``s3://``)."""
    import ray

    job = from_dict(JobConfig, job)
    s = job.scaling
    if not s.use_gpu:
        torch.set_num_threads(s.torch_threads or max(1, int(s.cpus_per_worker)))
    device = torch.device("cuda" if s.use_gpu else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU
    with node_cache.holding():  # this pooled worker runs other tasks later: the copies stay evictable then
        out = score_shard(node_cache.local_copy(uri), job, split, rank, world, device)  # a copy per node, once
    return {**out, "node": ray.get_runtime_context().get_node_id(), "device": str(device)}


def score_split(uri: str, job: JobConfig, split: str, workers: int = 1, address: str | None = None,
                on_cluster: bool | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every shard's logits and targets of the split (``score_shard``, in rank order), and where each ran.

    ``uri``: an absolute path or ``s3://`` (tasks run in other working directories). ``on_cluster``: None (default)
    on Ray if a cluster is connected or named or ``workers > 1``, True on Ray (starting a local cluster if none is
    named), False in this process. See the module docstring.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, not {workers}")
    address = address or job.address
    if on_cluster is None:
        on_cluster = workers > 1 or connected_or_named(address)
    if not on_cluster:
        return [score_shard(Path(node_cache.local_copy(uri)), job, split)], [{"rank": 0, "node": None, "device": "cpu"}]
    import ray

    init_ray(address)
    task = ray.remote(_evaluate_task).options(**task_options(job))
    shards = ray.get([task.remote(uri, to_dict(job), split, rank, workers) for rank in range(workers)])
    return shards, [{"rank": r, "node": s.pop("node"), "device": s.pop("device")} for r, s in enumerate(shards)]


def absolute(uri: str | Path) -> str:
    """``uri`` as the tasks of another working directory (or node) find it: ``s3://`` as is, a path made absolute."""
    return str(uri) if storage.is_s3(uri) else str(storage.local_path(uri))


def evaluate_checkpoint(uri: str, split: str = "val", overrides: list[str] = (), workers: int = 1,
                        output_dir: str | Path | None = None, address: str | None = None,
                        on_cluster: bool | None = None) -> dict[str, Any]:
    """Evaluate checkpoint ``uri`` (local or s3://); writes metrics.json, per_class_ap.csv/.png to output_dir.

    Where it runs: ``score_split``. The result says where each shard ran (``evaluated_on``: rank, Ray node id or
    None, device).
    """
    uri = absolute(uri)
    job = checkpoint_job(uri, list(overrides))
    shards, where = score_split(uri, job, split, workers, address, on_cluster)
    result = merge_shards(shards)
    result.update(checkpoint=str(uri), split=split, evaluated_on=where)
    if output_dir is not None:
        write_reports(result, Path(output_dir))
    return result


def write_reports(result: dict[str, Any], output_dir: Path) -> None:
    from ..plots import per_class_ap  # matplotlib: only where reports are written, not in every task

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
