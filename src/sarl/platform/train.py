"""``sarl train``: the model library's engine on Ray Train (data-parallel, checkpointed, resumable).

This file is the Ray Train adapter: ``train_loop_per_worker`` and ``run_training``. A worker builds the data,
mask and model exactly as ``sarl.model.experiment`` does in one process, wraps the model with ``prepare_model``
(DDP over gloo on CPU, NCCL on GPU), and runs ``engine.train_one_epoch`` / ``engine.evaluate``; the per-rank
pieces (evaluation shards, RNG streams, ``StepTogether``, epoch numbers over ranks) are
``sarl.model.distributed``. Each epoch ends with one ``ray.train.report`` carrying the validation metrics
(computed over the whole validation set: each worker scores a disjoint shard and torchmetrics gathers them), the
training loss and counts of all ranks, and a checkpoint written by rank 0 and uploaded in the background while the
next epoch trains (``run.checkpoint_upload``); its history row goes to the run (``runs.Run``) once it is in.

With ``cache.enabled`` the worker trains from cached visual features (``sarl.model.features``; an ``s3://``
root goes through ``feature_store``): rank 0 computes missing entries, the other ranks then hit, and every epoch
report carries ``cache_hits`` / ``cache_misses``.

Data sets, word vectors and weights named by ``s3://`` URIs are copied by the workers into their own node's cache
(``cluster.resolve_data_uris``, once per node); the driver only checks that they exist (``cluster.preflight``) and
resolves relative local paths (``cluster.absolute_paths``), as Train V2 runs the workers in directories of their
own.

A checkpoint holds the weights, the job (naming its URIs, not a node's copies), the partial-label mask and the
training state (epoch, optimizer, scheduler, every rank's RNG streams, CUDA's included), so a restarted worker
group, or a new run with the same name, storage and job (``Run.check_resume``, ``run.resume``), continues at the
next epoch with the same mask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import yaml
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..model import engine
from ..model.checkpoint import load_train_state, restore_train_state, save_checkpoint
from ..model.config import from_dict, to_dict
from ..model.data import collate_skip_bad
from ..model.distributed import StepTogether, global_train_stats, rank_rng_states, seed_everything, seed_rank, shard
from ..model.experiment import MASK_FILE, Splits, build_components, make_loader, prepare_cached, prepare_data
from ..model.metrics import MultiLabelMetrics
from . import storage
from .cluster import absolute_paths, init_ray, preflight, resolve_data_uris, signal_handlers_kept
from .feature_store import feature_cache
from .job import JobConfig
from .runs import JOB_FILE, REPORT_FILE, Run

log = logging.getLogger("sarl.train")


def _upload_then_record(job: JobConfig, report: dict[str, Any], staging: Path) -> Any:
    """Rank 0's ``checkpoint_upload_fn``: Ray's own upload, then the epoch's history row, then the staging
    directory removed. Runs in Train's upload thread (in order, one at a time) with ``checkpoint_upload: async``."""
    storage_context = ray.train.get_context().get_storage()

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        start = time.perf_counter()
        persisted = storage_context.persist_current_checkpoint(checkpoint, dir_name)
        Run.of(job).append_history({**report, "checkpoint_upload_s": time.perf_counter() - start})
        shutil.rmtree(staging, ignore_errors=True)  # only once uploaded: Ray's retries read it again
        return persisted

    return upload


def _maybe_fail(job: JobConfig, epoch: int, rank: int) -> None:
    """Recovery rehearsal: rank 0 raises once in ``run.fail_once_at_epoch`` (a marker makes it once only)."""
    if job.run.fail_once_at_epoch != epoch or rank != 0:
        return
    marker = Run.of(job).join(f".failed_once_at_epoch_{epoch}")
    if not storage.exists(marker):
        storage.write_text(marker, "failed once, as configured")
        # The rehearsal fails *after* the previous epoch's checkpoint is in (an asynchronous upload may still
        # run), so a test sees the same restart point every time.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        raise RuntimeError(f"injected failure in epoch {epoch} (run.fail_once_at_epoch)")


def scratch_prefix(job: JobConfig, kind: str, rank: int | None = None) -> str:
    """The prefix of a worker's temporary directories of ``kind`` (``worker``: a rank's resume copy and mask;
    ``checkpoint``: rank 0's epoch files until they are uploaded), named after the run (and its storage); the
    owner's process id follows (:func:`scratch_dir`)."""
    digest = hashlib.sha256(Run.of(job).uri.encode()).hexdigest()[:8]
    return f"sarl-{kind}-{job.run_name}-{digest}-" + ("" if rank is None else f"r{rank}-")


_SCRATCH_RE = re.compile(r"sarl-(?:worker|checkpoint)-.+-p(\d+)-[a-z0-9_]+")


def scratch_dir(job: JobConfig, kind: str, rank: int | None = None) -> Path:
    """A new temporary directory of ``kind`` (:func:`scratch_prefix`) owned by this process, whose id it names."""
    return Path(tempfile.mkdtemp(prefix=f"{scratch_prefix(job, kind, rank)}p{os.getpid()}-"))


def remove_orphaned_scratch() -> list[str]:
    """Remove the temporary directories of Train workers of this machine that are gone, of any run (returns their
    names): a rank Train killed once another failed, or with its trial when ASHA stopped it, never ran its own
    cleanup. A directory whose owner still runs (another run's, a trial's beside this one) stays."""
    removed = []
    for path in Path(tempfile.gettempdir()).iterdir():
        match = _SCRATCH_RE.fullmatch(path.name)
        if match and not _running(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Train worker. Its temporary directories go when it ends, a failed attempt's included (the resume copy,
    and checkpoints whose upload never finished: a restart writes them again); a worker Train killed cannot clean
    up, so each worker first removes what dead workers left on this node."""
    job = from_dict(JobConfig, config["job"])
    rank = ray.train.get_context().get_world_rank()
    if removed := remove_orphaned_scratch():
        log.info("removed %d temporary directories of Train workers that are gone: %s", len(removed),
                 ", ".join(removed[:3]) + (" ..." if len(removed) > 3 else ""))
    scratch = scratch_dir(job, "worker", rank)
    staged: list[Path] = []
    try:
        _train(config, job, scratch, staged)
    except BaseException:
        for staging in staged:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train(config: dict[str, Any], job: JobConfig, scratch: Path, staged: list[Path]) -> None:
    job = resolve_data_uris(job)  # s3:// data to this node's cache, once per node; config["job"] keeps the URIs
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if not job.scaling.use_gpu:
        torch.set_num_threads(job.scaling.torch_threads or max(1, int(job.scaling.cpus_per_worker)))
    seed_everything(job.train.seed)
    resume = ray.train.get_checkpoint()
    train_state = None
    if resume is not None:
        # each rank downloads its own copy: as_directory's temporary folder is shared by a node's ranks and
        # removed by the first one done with it, which can be under a rank that has not yet registered as a
        # reader (Ray 2.60: "Checkpoint directory ... does not exist, even though it should have been created")
        resume.to_directory(str(scratch / "resume"))
        shutil.copy(scratch / "resume" / MASK_FILE, scratch / MASK_FILE)  # resume with the saved mask
        train_state = load_train_state(scratch / "resume")
    if rank == 0:  # rows of epochs whose checkpoints were never committed go: those epochs run again
        Run.of(job).reconcile_history(int(train_state["epoch"]) if train_state else 0,
                                      scratch / "resume" if resume else None)
    splits = prepare_data(job, scratch)  # the mask is drawn from its seed, identically on every worker

    t = job.train

    def loaders(splits: Splits, num_workers: int, images: bool = True) -> tuple[DistributedSampler, Any, DataLoader,
                                                                                 DataLoader]:
        sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=t.seed,
                                     drop_last=True)
        train_loader = DataLoader(splits.train, batch_size=t.batch_size, sampler=sampler, drop_last=True,
                                  num_workers=num_workers, collate_fn=collate_skip_bad,
                                  persistent_workers=num_workers > 0)
        train_loader = ray.train.torch.prepare_data_loader(train_loader, add_dist_sampler=False)
        if images and world > 1 and job.data.on_bad_image == "skip":  # an all-unreadable batch: skip together
            train_loader = StepTogether(train_loader, device)
        val_loader = make_loader(shard(splits.val or splits.test, rank, world), t.eval_batch_size, False,
                                 num_workers)
        test_loader = make_loader(shard(splits.test, rank, world), t.eval_batch_size, False, num_workers)
        return sampler, train_loader, val_loader, test_loader

    sampler, train_loader, val_loader, test_loader = loaders(splits, job.data.num_workers)
    model, loss_fn, optimizer, scheduler = build_components(job, splits.categories, len(train_loader), world)
    source = config["job"]["model"].get("pretrained")
    if isinstance(source, str) and storage.is_s3(source):  # checkpoints name the URI, not this node's cache path
        model.config = dataclasses.replace(model.config, pretrained=source)
    start_epoch = 1
    if train_state is not None:  # on the device before the optimizer state is loaded (see restore_train_state)
        restore_train_state(model, optimizer, scheduler, scratch / "resume", train_state, device)
        start_epoch = int(train_state["epoch"]) + 1
    cache_report: dict[str, int] = {}
    if job.cache.enabled:
        # The ranks compute a missing entry together, a block of images each (FeatureCache.get_or_compute); the
        # loaders are rebuilt over the features with the same lengths, so the scheduler above still fits.
        parts = ("train", "val") if splits.val is not None else ("train", "test")
        parts = (*parts, "test") if t.test_every_epoch and "test" not in parts else parts
        splits, stats = prepare_cached(job, splits, model.to(device), device, parts, feature_cache(job.cache.root))
        if stats["enabled"]:
            cache_report = {"cache_hits": stats["hits"], "cache_misses": stats["misses"]}
            sampler, train_loader, val_loader, test_loader = loaders(splits, 0, images=False)  # memory-mapped rows
            if rank == 0:
                log.info(f"[{job.run_name}] feature cache {job.cache.root}: {stats['hits']} hit(s), "
                         f"{stats['misses']} miss(es)")
        elif rank == 0:
            log.warning(stats["reason"])
    seed_rank(t.seed, rank, world, train_state, device)  # after the model and the feature cache: same on all ranks
    model = ray.train.torch.prepare_model(model)
    bare = getattr(model, "module", model)
    metrics = MultiLabelMetrics(len(splits.categories)).to(device)

    for epoch in range(start_epoch, t.epochs + 1):
        sampler.set_epoch(epoch)
        epoch_start, started_at = time.perf_counter(), time.time()
        _maybe_fail(job, epoch, rank)
        stats = engine.train_one_epoch(model, train_loader, loss_fn, optimizer, device, epoch, scheduler,
                                       amp=t.amp, grad_clip=t.grad_clip, progress=t.progress and rank == 0,
                                       desc=f"{job.run_name} epoch {epoch}/{t.epochs}")
        stats = global_train_stats(stats, device)  # every rank's loss and samples, not rank 0's
        # The bare module: DDP's forward would broadcast buffers, a collective that uneven shards would hang.
        val = engine.evaluate(bare, val_loader, device, metrics=metrics, amp=t.amp, progress=False)
        report = {"epoch": epoch, "loss": stats["loss"], "val_mAP": val["mAP"], "val_CF1": val["CF1"],
                  "val_OF1": val["OF1"], "samples_per_s": stats["samples_per_s"], "lr": stats["lr"],
                  "samples": stats["samples"], "skipped_images": stats["skipped_images"],
                  "epoch_seconds": time.perf_counter() - epoch_start, "started_at": started_at, **cache_report}
        if t.test_every_epoch:  # measured only (the peers' test-selected number); selection stays on validation
            report["test_mAP"] = engine.evaluate(bare, test_loader, device, metrics=metrics, amp=t.amp,
                                                 progress=False)["mAP"]
        rng_states = rank_rng_states(device)  # a collective: each rank's stream goes into the checkpoint
        checkpoint, staging = None, None
        if rank == 0:
            staging = scratch_dir(job, "checkpoint")  # removed once uploaded
            staged.append(staging)
            state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": rng_states[0], "rng_per_rank": rng_states}
            save_checkpoint(bare, staging, train_state=state, extra={"epoch": epoch, "val_mAP": val["mAP"]})
            shutil.copy(scratch / MASK_FILE, staging / MASK_FILE)
            (staging / REPORT_FILE).write_text(json.dumps(report))
            (staging / JOB_FILE).write_text(yaml.safe_dump(config["job"], sort_keys=False))  # URIs, not cache paths
            checkpoint = ray.train.Checkpoint.from_directory(staging)
            if job.run.log_every_epoch:
                # A logger, not print: Train V2 patches print into its logger *and* the worker's stdout.
                log.info(f"[{job.run_name}] epoch {epoch}/{t.epochs}  loss {stats['loss']:.4f}  "
                         f"val mAP {val['mAP']:.2f}  {report['samples_per_s']:.0f} samples/s")
        if job.run.checkpoint_upload == "async":
            # The files are written; Train uploads them in its upload thread while the next epoch trains, and rank
            # 0's upload function appends the history row once they are in storage.
            ray.train.report(report, checkpoint=checkpoint,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                             delete_local_checkpoint_after_upload=False,
                             checkpoint_upload_fn=_upload_then_record(job, report, staging) if rank == 0 else None)
        else:
            report_start = time.perf_counter()
            ray.train.report(report, checkpoint=checkpoint)
            if rank == 0:  # after the report: an epoch is in the history once its checkpoint is persisted
                Run.of(job).append_history({**report, "checkpoint_upload_s": time.perf_counter() - report_start})
                shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------- driver
def scaling_config(job: JobConfig) -> ray.train.ScalingConfig:
    s = job.scaling
    return ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                   resources_per_worker=s.worker_resources())


def run_config(job: JobConfig, callbacks: list[Any] | None = None) -> ray.train.RunConfig:
    """Where the run lives, failures tolerated, checkpoints kept; ``callbacks`` (Tune's reporter) run on the driver."""
    filesystem, path = storage.pyarrow_filesystem(job.run.storage_path)
    if filesystem is None:
        path = str(storage.local_path(path))
    return ray.train.RunConfig(
        name=job.run_name, storage_path=path, storage_filesystem=filesystem, callbacks=callbacks,
        failure_config=ray.train.FailureConfig(max_failures=job.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.run.keep_checkpoints,
                                                     checkpoint_score_attribute="val_mAP",
                                                     checkpoint_score_order="max"))


def run_training(job: JobConfig) -> dict[str, Any]:
    """Fit the job on Ray Train; returns the best checkpoint's URI and metrics and the per-epoch history."""
    from ray.train.torch import TorchTrainer

    job = absolute_paths(job)  # the workers run elsewhere (their own working directory, other nodes)
    preflight(job)
    run = Run.of(job)
    run.check_resume(job)  # a rerun of the name with another job stops here, before Ray starts
    init_ray(job.address, num_cpus=None)
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"job": to_dict(job)},
                           scaling_config=scaling_config(job), run_config=run_config(job))
    with signal_handlers_kept():
        result = trainer.fit()
    if result.error:
        raise result.error
    checkpoint = result.get_best_checkpoint(metric="val_mAP", mode="max")
    if checkpoint is None:
        raise RuntimeError(f"run {job.run_name} reported no checkpoint")
    metrics = next(m for c, m in result.best_checkpoints if c.path == checkpoint.path)
    uri = run.checkpoint_uri(checkpoint)
    return {"checkpoint": uri, "metrics": metrics, "history": run.history(),
            "aliases": run.publish_aliases(uri, metrics, job.run.alias),
            "latest_checkpoint": run.checkpoint_uri(result.checkpoint) if result.checkpoint else None}
