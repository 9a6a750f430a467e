"""``sarl train``: the model library's engine on Ray Train (data-parallel, checkpointed, resumable).

Every Ray call of a training job is in this file. A worker builds the data, mask and model exactly as
``sarl.model.experiment`` does in one process, wraps the model with ``prepare_model`` (DDP over gloo on CPU,
NCCL on GPU), and runs ``engine.train_one_epoch`` / ``engine.evaluate``. Each epoch ends with one
``ray.train.report`` carrying the validation metrics (computed over the whole validation set: each worker
scores a disjoint shard and torchmetrics gathers them), the training loss and counts of all ranks, and a
checkpoint written by rank 0 and uploaded in the background while the next epoch trains (``run.checkpoint_upload``).

With ``cache.enabled`` the worker trains from cached visual features (``sarl.model.features``; an ``s3://``
root goes through ``feature_store``): rank 0 computes missing entries, the other ranks then hit, and every epoch
report carries ``cache_hits`` / ``cache_misses``.

Data sets, word vectors and weights named by ``s3://`` URIs are copied by the workers into their own node's cache
(``resolve_data_uris``, once per node); the driver only checks that they exist (``preflight``) and resolves relative
local paths (``absolute_paths``), as Train V2 runs the workers in directories of their own.

A checkpoint holds the weights, the job (naming its URIs, not a node's copies), the partial-label mask and the
training state (epoch, optimizer, scheduler, every rank's RNG streams, CUDA's included), so a restarted worker
group, or a new run with the same name, storage and job (``check_resume``, ``run.resume``), continues at the next
epoch with the same mask.
"""

from __future__ import annotations

import copy
import dataclasses
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
from ..model.config import ConfigError, from_dict, to_dict
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
from . import node_cache, storage
from .feature_store import feature_cache
from .job import JobConfig
from .word_vectors import check_trusted, local_word_vectors

JOB_FILE = "job.yaml"
REPORT_FILE = "report.json"  # in each checkpoint: the epoch's history row, to restore a row a failure lost
HISTORY_FILE = "history.jsonl"
log = logging.getLogger("sarl.train")


# ------------------------------------------------------------------------------------------- per worker
def shard(dataset, rank: int, world: int):
    """Disjoint, unpadded shard for evaluation: metrics over all shards equal metrics over the whole set."""
    return dataset.subset(np.arange(rank, len(dataset), world))


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG states, and the CUDA generator's of ``device`` when on CUDA."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    if "cuda" in state and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _distributed() -> bool:
    """Whether this worker is one of several in a torch.distributed process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_rng_states(device: torch.device | None = None) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it), so each rank resumes its own."""
    mine = rng_state(device)
    if not _distributed():
        return [mine]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, mine)
    return states


def seed_rank(seed: int, rank: int, world: int, train_state: dict[str, Any] | None,
              device: torch.device | None = None) -> None:
    """This rank's own RNG stream, drawn from after the model is built (so every rank builds the same model).

    The stream seeds the DataLoader's worker processes (Python, NumPy and torch seeds) and the augmentations: a
    new run reseeds rank r > 0 with ``seed + r`` (rank 0 goes on from ``seed``), a resumed one restores the state
    each rank saved (CUDA's too). The DistributedSampler keeps the shared seed, so the shards stay disjoint.
    """
    saved = (train_state or {}).get("rng_per_rank")
    if saved is not None and len(saved) == world:
        set_rng_state(saved[rank], device)
    elif train_state is not None and rank == 0:  # a checkpoint from before per-rank states: rank 0's only
        set_rng_state(train_state["rng"], device)
    elif rank > 0:
        seed_everything(seed + rank)


def restore_train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        resume_dir: Path, train_state: dict[str, Any], device: torch.device | str | torch.dtype):
    """Load a checkpoint's weights and optimizer / scheduler state into freshly built components on ``device``.

    The model moves first: ``Optimizer.load_state_dict`` casts each state tensor to its parameter's device (and
    dtype) as it loads, and a later ``Module.to`` (``prepare_model``) moves the parameters but not the optimizer
    state, so on a GPU the first step would mix devices (the foreach kernels refuse). Returns the model.
    """
    model.to(device)
    load_trainable_state(model, resume_dir)  # same towers: the backbone source is not read again
    optimizer.load_state_dict(train_state["optimizer"])
    scheduler.load_state_dict(train_state["scheduler"])
    return model


class StepTogether:
    """A training loader whose ranks all take a step or all skip it.

    With ``data.on_bad_image: skip`` a batch whose every image is unreadable comes out empty and the engine skips
    the step; a rank skipping alone would miss the DDP all-reduce of that step's backward while the others wait in
    it (a hang). One small all-reduce per batch tells every rank whether any rank's batch is empty, and then every
    rank yields an empty batch (its unreadable count kept), so all skip together.
    """

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # dataset, sampler ... of the wrapped loader
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            inputs = batch[0]
            n = int((inputs[0] if isinstance(inputs, (tuple, list)) else inputs).shape[0])
            flag = torch.tensor([1.0 if n > 0 else 0.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            if flag.item() == 0 and n > 0:
                yield torch.empty(0), torch.empty(0), int(batch[2]) if len(batch) > 2 else 0
            else:
                yield batch


def global_train_stats(stats: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """An epoch's training numbers over all ranks (a collective): the loss averaged over every rank's samples,
    samples and skipped images summed, samples/s of the group (all samples over the slowest rank's time)."""
    if not _distributed():
        return dict(stats)
    dist = torch.distributed
    n = float(stats["samples"])
    elapsed = n / stats["samples_per_s"] if stats["samples_per_s"] > 0 else 0.0
    sums = torch.tensor([stats["loss"] * n, n, float(stats.get("skipped_images", 0))], dtype=torch.float64,
                        device=device)
    slowest = torch.tensor([elapsed], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    loss_sum, samples, skipped = sums.tolist()
    return {**stats, "loss": loss_sum / max(samples, 1.0), "samples": int(samples), "skipped_images": int(skipped),
            "samples_per_s": samples / slowest.item() if slowest.item() > 0 else 0.0}


def _upload_then_record(job: JobConfig, report: dict[str, Any], staging: Path) -> Any:
    """Rank 0's ``checkpoint_upload_fn``: Ray's own upload, then the epoch's history row, then the staging
    directory removed. Runs in Train's upload thread (in order, one at a time) with ``checkpoint_upload: async``."""
    storage_context = ray.train.get_context().get_storage()

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        start = time.perf_counter()
        persisted = storage_context.persist_current_checkpoint(checkpoint, dir_name)
        append_history(job, {**report, "checkpoint_upload_s": time.perf_counter() - start})
        shutil.rmtree(staging, ignore_errors=True)  # only once uploaded: Ray's retries read it again
        return persisted

    return upload


def _maybe_fail(job: JobConfig, epoch: int, rank: int) -> None:
    """Recovery rehearsal: rank 0 raises once in ``run.fail_once_at_epoch`` (a marker makes it once only)."""
    if job.run.fail_once_at_epoch != epoch or rank != 0:
        return
    marker = storage.join(job.run.storage_path, job.run_name, f".failed_once_at_epoch_{epoch}")
    if not storage.exists(marker):
        storage.write_text(marker, "failed once, as configured")
        # The rehearsal fails *after* the previous epoch's checkpoint is in (an asynchronous upload may still
        # run), so a test sees the same restart point every time.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        raise RuntimeError(f"injected failure in epoch {epoch} (run.fail_once_at_epoch)")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    job = from_dict(JobConfig, config["job"])
    job = resolve_data_uris(job)  # s3:// data to this node's cache, once per node; config["job"] keeps the URIs
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
    if rank == 0:  # rows of epochs whose checkpoints were never committed go: those epochs run again
        reconcile_history(job, int(train_state["epoch"]) if train_state else 0, scratch / "resume" if resume else None)
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
            staging = Path(tempfile.mkdtemp(prefix="sarl-checkpoint-"))  # removed once uploaded
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
                append_history(job, {**report, "checkpoint_upload_s": time.perf_counter() - report_start})
                shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)


def history_uri(job: JobConfig) -> str:
    return storage.join(job.run.storage_path, job.run_name, HISTORY_FILE)


def append_history(job: JobConfig, report: dict[str, Any]) -> None:
    """One JSON line per epoch in the run's storage: Ray's own table keeps only the checkpoints it kept."""
    uri = history_uri(job)
    previous = storage.read_text(uri) if storage.exists(uri) else ""
    storage.write_text(uri, previous + json.dumps(report) + "\n")


def reconcile_history(job: JobConfig, epoch: int, checkpoint_dir: Path | None) -> None:
    """Make ``history.jsonl`` hold epochs 1..``epoch`` exactly once when a run (re)starts from the checkpoint of
    ``epoch`` (0 and ``None``: from no checkpoint): the epochs the run is about to redo lose their rows, and the
    checkpoint's own row comes back if the failure struck between the checkpoint's upload and the row's
    (``report.json`` in the checkpoint).

    A worker can die after an epoch's row is written but before Train commits that epoch's checkpoint (the row
    comes after the upload, the commit after every rank reported), so a restart redoes an epoch the file has; or
    after the commit but before the row. The file is rewritten only when it differs, and what changed is logged.
    """
    uri = history_uri(job)
    rows = [json.loads(line) for line in (storage.read_text(uri) if storage.exists(uri) else "").splitlines()
            if line.strip()]
    kept = [row for row in rows if row["epoch"] <= epoch]
    restored = None
    if (checkpoint_dir is not None and not any(row["epoch"] == epoch for row in kept)
            and (checkpoint_dir / REPORT_FILE).is_file()):
        restored = json.loads((checkpoint_dir / REPORT_FILE).read_text())
        kept.append(restored)
    if kept == rows:
        return
    dropped = sorted({row["epoch"] for row in rows if row["epoch"] > epoch})
    log.warning(f"[{job.run_name}] resuming after epoch {epoch}: history.jsonl "
                + (f"drops the rows of epochs {dropped}, which are run again" if dropped else "")
                + (" and " if dropped and restored else "")
                + (f"gets epoch {epoch}'s row back from its checkpoint" if restored else ""))
    storage.write_text(uri, "".join(json.dumps(row) + "\n" for row in kept))


def read_history(job: JobConfig) -> list[dict[str, Any]]:
    """Every epoch the run reported, in order (a repeated epoch keeps its last report)."""
    return read_history_file(history_uri(job))


def read_history_file(uri: str) -> list[dict[str, Any]]:
    """The rows of a ``history.jsonl`` at ``uri``, one per epoch in order (a repeated epoch keeps its last row)."""
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


# Job fields a rerun may change and still resume the run: how it runs, not what it trains.
RESUME_IGNORED = ("name", "address", "run.name", "run.storage_path", "run.max_failures", "run.keep_checkpoints",
                  "run.fail_once_at_epoch", "run.log_every_epoch", "run.resume", "run.checkpoint_upload", "run.alias",
                  "train.progress", "data.num_workers", "scaling.torch_threads")
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Train V2's record of a run's checkpoints


def latest_checkpoint_result(job: JobConfig) -> dict[str, Any]:
    """The latest checkpoint in Train's committed snapshot of the run (``checkpoint_dir_name``, ``metrics``): what
    a restart or a rerun of the name resumes from; empty when there is none."""
    try:
        snapshot = storage.read_text(storage.join(job.run.storage_path, job.run_name, SNAPSHOT_FILE))
    except FileNotFoundError:
        return {}
    return json.loads(snapshot).get("latest_checkpoint_result") or {}


def stored_job(job: JobConfig) -> tuple[str, dict[str, Any]] | None:
    """``(checkpoint URI, job dict)`` of the run's latest checkpoint (what a rerun of the name resumes), or None."""
    run = storage.join(job.run.storage_path, job.run_name)
    name = latest_checkpoint_result(job).get("checkpoint_dir_name")
    if not name or not storage.exists(storage.join(run, name, JOB_FILE)):
        return None
    return storage.join(run, name), yaml.safe_load(storage.read_text(storage.join(run, name, JOB_FILE))) or {}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{dotted.key: leaf}`` (an empty mapping is a leaf)."""
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def job_differences(old: dict[str, Any], new: dict[str, Any], ignored: tuple[str, ...] = RESUME_IGNORED) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs, outside ``ignored`` (and their sub-keys)."""
    a, b = _flat(old), _flat(new)
    missing = object()
    return [f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}" for key in sorted(set(a) | set(b))
            if not any(key == i or key.startswith(i + ".") for i in ignored)
            and a.get(key, missing) != b.get(key, missing)]


def check_resume(job: JobConfig) -> None:
    """Before a run starts: a run name that already has a checkpoint is resumed only as ``run.resume`` allows.

    ``auto`` resumes when the latest checkpoint's job is this job (``RESUME_IGNORED`` aside) and raises
    ``ConfigError`` naming every difference otherwise; ``always`` resumes anyway, with a warning naming them;
    ``never`` refuses any existing run.
    """
    found = stored_job(job)
    if found is None:
        return
    uri, old = found
    where = f"run {job.run_name!r} in {job.run.storage_path}"
    if job.run.resume == "never":
        raise ConfigError(f"{where} already has a checkpoint ({uri}) and run.resume=never: pick a new run.name, "
                          "or run.resume=auto to continue it")
    differences = job_differences(old, to_dict(job))
    if not differences:
        return
    listed = "\n".join(f"  - {d}" for d in differences)
    if job.run.resume == "always":
        log.warning(f"{where}: resuming {uri} with a changed job (run.resume=always):\n{listed}")
        return
    raise ConfigError(f"{where} already has a checkpoint ({uri}) of a different job:\n{listed}\n"
                      "Pick a new run.name for a new run, or set run.resume=always to continue this one with the "
                      "changed job.")


def preflight(job: JobConfig) -> None:
    """Checks that fail fast, before any worker starts: storage reachable and writable, data present."""
    storage.check_writable(job.run.storage_path)
    if job.data.root and not storage.is_s3(job.data.root) and not Path(job.data.root).expanduser().exists():
        raise FileNotFoundError(f"data.root {job.data.root} does not exist")
    for key, uri in data_sources(job):  # on S3: a HEAD or a one-key listing each; every node copies its own
        if storage.is_s3(uri) and not storage.exists(uri):
            raise FileNotFoundError(f"{key} {uri} does not exist")
    if isinstance(job.model.get("word_vectors"), str):
        check_trusted(job.model["word_vectors"])  # a pickle from storage: refused here, not in every worker
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


def data_sources(job: JobConfig, model_files: bool = True) -> list[tuple[str, str]]:
    """``(job key, URI or path)`` of what the job reads besides its checkpoints: the data set, and with
    ``model_files`` the word vectors and the weights source (``model.pretrained``: a path, URI or open_clip tag)."""
    sources = [("data.root", job.data.root)]
    if model_files:
        sources += [(f"model.{key}", job.model.get(key)) for key in ("word_vectors", "pretrained")]
    return [(key, value) for key, value in sources if isinstance(value, str) and value]


def resolve_data_uris(job: JobConfig, model_files: bool = True) -> JobConfig:
    """A copy of ``job`` whose ``s3://`` data set (with ``model_files``: word vectors and weights too) are local
    paths *on the node this runs on*: its node cache (``node_cache.local_copy``), filled once per node and version
    under a file lock however many workers of the node ask at once.

    The workers call it (``train_loop_per_worker``, evaluation tasks), never the driver: the job they are sent and
    the ``job.yaml`` a checkpoint keeps name the URIs, so a checkpoint evaluates on any machine. Pickled word
    vectors from storage are refused before any download unless trusted (``word_vectors``).
    """
    job = copy.deepcopy(job)
    for key, value in data_sources(job, model_files):
        if not storage.is_s3(value):
            continue
        if key == "data.root":
            job.data.root = str(node_cache.local_copy(value))
        else:
            fetch = local_word_vectors if key == "model.word_vectors" else node_cache.local_copy  # pickles refused
            job.model[key.split(".", 1)[1]] = str(fetch(value))
    return job


def absolute_paths(job: JobConfig) -> JobConfig:
    """A copy of ``job`` whose relative local paths are absolute, resolved in this process's working directory.

    Train V2 runs every worker in a directory of its own (``<session>/artifacts/<run>``: ``RAY_CHDIR_TO_TRIAL_DIR``)
    and Tune its trial functions in theirs, so a relative ``run.storage_path`` (the default ``runs/ray``) put
    ``history.jsonl`` and the failure markers where the driver never reads them, and a relative data set, word
    vectors or cache root was looked up there. The driver resolves them once, before it ships the job. ``~`` stays
    for the node to expand (its own home), except in ``run.storage_path``, which Ray expands on the driver too.
    """
    job = copy.deepcopy(job)

    def absolute(value: str | None, must_exist: bool = False) -> str | None:
        if not value or storage.is_s3(value) or value.startswith("~") or Path(value).is_absolute():
            return value
        return str(Path(value).resolve()) if not must_exist or Path(value).exists() else value

    if not storage.is_s3(job.run.storage_path):
        job.run.storage_path = str(Path(job.run.storage_path).expanduser().resolve())
    job.data.root = absolute(job.data.root)
    job.cache.root = absolute(job.cache.root)
    for key in ("word_vectors", "pretrained"):  # a name that is no file here (an open_clip tag) stays a name
        if isinstance(job.model.get(key), str):
            job.model[key] = absolute(job.model[key], must_exist=True)
    return job


def run_training(job: JobConfig) -> dict[str, Any]:
    """Fit the job on Ray Train; returns the best checkpoint's URI and metrics and the per-epoch history."""
    from ray.train.torch import TorchTrainer

    job = absolute_paths(job)  # the workers run elsewhere (their own working directory, other nodes)
    preflight(job)
    check_resume(job)  # a rerun of the name with another job stops here, before Ray starts
    init_ray(job.address, num_cpus=None)
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"job": to_dict(job)},
                           scaling_config=scaling_config(job), run_config=run_config(job))
    result = trainer.fit()
    if result.error:
        raise result.error
    best = sorted(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_mAP", float("-inf")))
    if not best:
        raise RuntimeError(f"run {job.run_name} reported no checkpoint")
    checkpoint, metrics = best[-1]
    uri = checkpoint_uri(job, checkpoint)
    return {"checkpoint": uri, "metrics": metrics, "history": read_history(job),
            "aliases": publish_aliases(job, uri, metrics),
            "latest_checkpoint": checkpoint_uri(job, result.checkpoint) if result.checkpoint else None}


def publish_aliases(job: JobConfig, checkpoint: str, metrics: dict[str, Any]) -> dict[str, str]:
    """Point the run's ``best`` alias (and ``run.alias``) at its best checkpoint; {name: alias file URI}."""
    from .aliases import publish_alias

    run = storage.join(job.run.storage_path, job.run_name)
    model_id = f"{job.run_name}:epoch-{metrics.get('epoch')}" if "epoch" in metrics else job.run_name
    kept = {k: metrics[k] for k in ("epoch", "val_mAP", "val_CF1", "val_OF1") if k in metrics}
    names = ["best", *([job.run.alias] if job.run.alias else [])]
    return {name: publish_alias(run, name, checkpoint, model_id, kept) for name in names}
