"""``sarl train``: the model library's engine on Ray Train (data-parallel, checkpointed, resumable).

Every Ray call of a training job is in this file. A worker builds the data, mask and model exactly as
``sarl.model.experiment`` does in one process, wraps the model with ``prepare_model`` (DDP over gloo on CPU,
NCCL on GPU), and runs ``engine.train_one_epoch`` / ``engine.evaluate``. Each epoch ends with one
``ray.train.report`` carrying the validation metrics (computed over the whole validation set: each worker
scores a disjoint shard and torchmetrics gathers them) and a checkpoint written by rank 0.

With ``cache.enabled`` the worker trains from cached visual features (``sarl.model.features``; an ``s3://``
root goes through ``feature_store``): rank 0 computes missing entries, the other ranks then hit, and every epoch
report carries ``cache_hits`` / ``cache_misses``.

A checkpoint holds the weights, the resolved job, the partial-label mask and the training state (epoch,
optimizer, scheduler, RNG), so a restarted worker group, or a new run with the same name and storage,
continues at the next epoch with the same mask.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import yaml
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..model import engine
from ..model.checkpoint import load_train_state, load_trainable_state, save_checkpoint
from ..model.config import from_dict, to_dict
from ..model.data import collate_skip_bad
from ..model.experiment import (
    MASK_FILE,
    Splits,
    build_components,
    cache_disabled_reason,
    make_loader,
    prepare_cached,
    prepare_data,
    seed_everything,
)
from ..model.metrics import MultiLabelMetrics
from . import storage
from .feature_store import feature_cache
from .job import JobConfig
from .word_vectors import local_word_vectors

JOB_FILE = "job.yaml"
HISTORY_FILE = "history.jsonl"
log = logging.getLogger("sarl.train")


# ------------------------------------------------------------------------------------------- per worker
def shard(dataset, rank: int, world: int):
    """Disjoint, unpadded shard for evaluation: metrics over all shards equal metrics over the whole set."""
    return dataset.subset(np.arange(rank, len(dataset), world))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))


def _maybe_fail(job: JobConfig, epoch: int, rank: int) -> None:
    """Recovery rehearsal: rank 0 raises once in ``run.fail_once_at_epoch`` (a marker makes it once only)."""
    if job.run.fail_once_at_epoch != epoch or rank != 0:
        return
    marker = storage.join(job.run.storage_path, job.run_name, f".failed_once_at_epoch_{epoch}")
    if not storage.exists(marker):
        storage.write_text(marker, "failed once, as configured")
        raise RuntimeError(f"injected failure in epoch {epoch} (run.fail_once_at_epoch)")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    job = from_dict(JobConfig, config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if not job.scaling.use_gpu:
        torch.set_num_threads(job.scaling.torch_threads or max(1, int(job.scaling.cpus_per_worker)))
    seed_everything(job.train.seed)
    scratch = Path(tempfile.mkdtemp(prefix="sarl-worker-"))
    resume = ray.train.get_checkpoint()
    train_state = None
    if resume is not None:
        with resume.as_directory() as ckpt_dir:
            shutil.copytree(ckpt_dir, scratch / "resume")
        shutil.copy(scratch / "resume" / MASK_FILE, scratch / MASK_FILE)  # resume with the saved mask
        train_state = load_train_state(scratch / "resume")
    splits = prepare_data(job, scratch)  # the mask is drawn from its seed, identically on every worker

    t = job.train

    def loaders(splits: Splits, num_workers: int) -> tuple[DistributedSampler, DataLoader, DataLoader, DataLoader]:
        sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=t.seed,
                                     drop_last=True)
        train_loader = DataLoader(splits.train, batch_size=t.batch_size, sampler=sampler, drop_last=True,
                                  num_workers=num_workers, collate_fn=collate_skip_bad,
                                  persistent_workers=num_workers > 0)
        train_loader = ray.train.torch.prepare_data_loader(train_loader, add_dist_sampler=False)
        val_loader = make_loader(shard(splits.val or splits.test, rank, world), t.eval_batch_size, False,
                                 num_workers)
        test_loader = make_loader(shard(splits.test, rank, world), t.eval_batch_size, False, num_workers)
        return sampler, train_loader, val_loader, test_loader

    sampler, train_loader, val_loader, test_loader = loaders(splits, job.data.num_workers)
    model, loss_fn, optimizer, scheduler = build_components(job, splits.categories, len(train_loader), world)
    start_epoch = 1
    if train_state is not None:
        load_trainable_state(model, scratch / "resume")  # same towers: the backbone source is not read again
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        set_rng_state(train_state["rng"])
        start_epoch = int(train_state["epoch"]) + 1
    cache_report: dict[str, int] = {}
    if job.cache.enabled:
        # Rank 0 computes missing entries first, the others hit after a barrier (prepare_cached); the loaders
        # are rebuilt over the features with the same lengths, so the scheduler above still fits.
        parts = ("train", "val") if splits.val is not None else ("train", "test")
        parts = (*parts, "test") if t.test_every_epoch and "test" not in parts else parts
        splits, stats = prepare_cached(job, splits, model.to(device), device, parts, feature_cache(job.cache.root))
        if stats["enabled"]:
            cache_report = {"cache_hits": stats["hits"], "cache_misses": stats["misses"]}
            sampler, train_loader, val_loader, test_loader = loaders(splits, 0)  # memory-mapped rows: no workers
            if rank == 0:
                log.info(f"[{job.run_name}] feature cache {job.cache.root}: {stats['hits']} hit(s), "
                         f"{stats['misses']} miss(es)")
        elif rank == 0:
            log.warning(stats["reason"])
    model = ray.train.torch.prepare_model(model)
    bare = getattr(model, "module", model)
    metrics = MultiLabelMetrics(len(splits.categories)).to(device)

    for epoch in range(start_epoch, t.epochs + 1):
        sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()
        _maybe_fail(job, epoch, rank)
        stats = engine.train_one_epoch(model, train_loader, loss_fn, optimizer, device, epoch, scheduler,
                                       amp=t.amp, grad_clip=t.grad_clip, progress=t.progress and rank == 0,
                                       desc=f"{job.run_name} epoch {epoch}/{t.epochs}")
        # The bare module: DDP's forward would broadcast buffers, a collective that uneven shards would hang.
        val = engine.evaluate(bare, val_loader, device, metrics=metrics, amp=t.amp, progress=False)
        report = {"epoch": epoch, "loss": stats["loss"], "val_mAP": val["mAP"], "val_CF1": val["CF1"],
                  "val_OF1": val["OF1"], "samples_per_s": stats["samples_per_s"] * world, "lr": stats["lr"],
                  "samples": stats["samples"] * world, "epoch_seconds": time.perf_counter() - epoch_start,
                  **cache_report}
        if t.test_every_epoch:  # measured only (the peers' test-selected number); selection stays on validation
            report["test_mAP"] = engine.evaluate(bare, test_loader, device, metrics=metrics, amp=t.amp,
                                                 progress=False)["mAP"]
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "rng": rng_state()}
                save_checkpoint(bare, tmp, train_state=state, extra={"epoch": epoch, "val_mAP": val["mAP"]})
                shutil.copy(scratch / MASK_FILE, Path(tmp) / MASK_FILE)
                (Path(tmp) / JOB_FILE).write_text(yaml.safe_dump(to_dict(job), sort_keys=False))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if job.run.log_every_epoch:
                    # A logger, not print: Train V2 patches print into its logger *and* the worker's stdout.
                    log.info(f"[{job.run_name}] epoch {epoch}/{t.epochs}  loss {stats['loss']:.4f}  "
                             f"val mAP {val['mAP']:.2f}  {report['samples_per_s']:.0f} samples/s")
            ray.train.report(report, checkpoint=checkpoint)
        if rank == 0:  # after the report: an epoch is in the history once its checkpoint is persisted
            append_history(job, report)
    shutil.rmtree(scratch, ignore_errors=True)


def history_uri(job: JobConfig) -> str:
    return storage.join(job.run.storage_path, job.run_name, HISTORY_FILE)


def append_history(job: JobConfig, report: dict[str, Any]) -> None:
    """One JSON line per epoch in the run's storage: Ray's own table keeps only the checkpoints it kept."""
    uri = history_uri(job)
    previous = storage.read_text(uri) if storage.exists(uri) else ""
    storage.write_text(uri, previous + json.dumps(report) + "\n")


def read_history(job: JobConfig) -> list[dict[str, Any]]:
    """Every epoch the run reported, in order (a repeated epoch keeps its last report)."""
    uri = history_uri(job)
    if not storage.exists(uri):
        return []
    rows = {}
    for line in storage.read_text(uri).splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


# ------------------------------------------------------------------------------------------- driver
def scaling_config(job: JobConfig) -> ray.train.ScalingConfig:
    s = job.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker or 1
    return ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources)


def run_config(job: JobConfig, callbacks: list[Any] | None = None) -> ray.train.RunConfig:
    """Where the run lives, failures tolerated, checkpoints kept; ``callbacks`` (Tune's reporter) run on the driver."""
    filesystem, path = storage.pyarrow_filesystem(job.run.storage_path)
    if filesystem is None:
        path = str(Path(path).expanduser().resolve())
    return ray.train.RunConfig(
        name=job.run_name, storage_path=path, storage_filesystem=filesystem, callbacks=callbacks,
        failure_config=ray.train.FailureConfig(max_failures=job.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.run.keep_checkpoints,
                                                     checkpoint_score_attribute="val_mAP",
                                                     checkpoint_score_order="max"))


def checkpoint_uri(job: JobConfig, checkpoint: ray.train.Checkpoint) -> str:
    """A URI users can pass back to ``sarl evaluate`` / ``sarl serve`` (``s3://`` for S3 storage)."""
    return f"s3://{checkpoint.path}" if storage.is_s3(job.run.storage_path) else checkpoint.path


def preflight(job: JobConfig) -> None:
    """Checks that fail fast, before any worker starts: storage reachable and writable, data present."""
    storage.check_writable(job.run.storage_path)
    if job.data.root and not storage.is_s3(job.data.root) and not Path(job.data.root).expanduser().exists():
        raise FileNotFoundError(f"data.root {job.data.root} does not exist")
    if job.cache.enabled:
        reason = cache_disabled_reason(job)
        if reason:
            log.warning(reason)
        else:
            root = job.cache.root
            storage.check_writable(root if storage.is_s3(root) else Path(root).expanduser())


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool | None = None) -> str | None:
    """Connect to ``address`` (or $RAY_ADDRESS), else start a local cluster; a no-op when already connected.

    Returns the dashboard's address (host:port) when this call started or joined a cluster that has one.
    ``dashboard=False`` saves the dashboard's CPU on small machines (benchmarks); Train's placement-group
    cleaner then logs State API warnings, as the State API is served by the dashboard.
    """
    if ray.is_initialized():
        return None
    import os

    address = address or os.environ.get("RAY_ADDRESS")
    local = {} if address else {"num_cpus": num_cpus, "include_dashboard": dashboard}
    context = ray.init(address=address, log_to_driver=True, **local,
                       runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}})
    return context.dashboard_url or None


def resolve_data_uris(job: JobConfig) -> JobConfig:
    """Data sets, word-vector and weight files given as s3:// URIs are copied to a local cache first.

    This runs on the driver; on a multi-node cluster every node needs the files, so point ``data.root`` at
    storage all nodes mount or copy (the cache path is the same on every node).
    """
    if job.data.root and storage.is_s3(job.data.root):
        job.data.root = str(storage.local_copy(job.data.root))
    for key in ("word_vectors", "pretrained"):
        value = job.model.get(key)
        if isinstance(value, str) and storage.is_s3(value):
            fetch = local_word_vectors if key == "word_vectors" else storage.local_copy  # pickles refused
            job.model[key] = str(fetch(value))
    return job


def run_training(job: JobConfig) -> dict[str, Any]:
    """Fit the job on Ray Train; returns the best checkpoint's URI and metrics and the per-epoch history."""
    from ray.train.torch import TorchTrainer

    preflight(job)
    init_ray(job.address, num_cpus=None)
    job = resolve_data_uris(job)
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"job": to_dict(job)},
                           scaling_config=scaling_config(job), run_config=run_config(job))
    result = trainer.fit()
    if result.error:
        raise result.error
    best = sorted(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_mAP", float("-inf")))
    if not best:
        raise RuntimeError(f"run {job.run_name} reported no checkpoint")
    checkpoint, metrics = best[-1]
    return {"checkpoint": checkpoint_uri(job, checkpoint), "metrics": metrics, "history": read_history(job),
            "latest_checkpoint": checkpoint_uri(job, result.checkpoint) if result.checkpoint else None}
