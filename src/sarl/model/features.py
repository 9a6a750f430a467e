"""Feature cache for frozen visual towers: dense and global features computed once, trained on many times.

With the visual tower frozen, ``SARLModel.encode_image`` gives the same features for an image in every epoch
and every trial of a sweep; only the decoupling, prompts and head train. ``FeatureCache`` computes those
features once per *key* and stores them on a local path; trials then feed ``SARLModel.forward_features`` from
``FeatureDataset`` and skip the tower.

The key is every input the features depend on (``cache_key``): the data set (kind, root, split, options,
categories and a hash of its item list), the backbone (``ModelConfig.clip``), a sha256 over the visual tower's
tensors (so random weights of another seed, or another pretrained file, miss), whether the dense features
start with a mean token (the ``dualcoop`` head's extra region), whether the visual tower runs QuickGELU (an
activation the state dict cannot show; ResNet towers have none), the resolution, the transform
(its ``repr``, which names sizes, mean, std and augmentations), the number of fixed augmented views, their seed
and the storage dtype. Its sha256 names the entry; a change to any input misses. What the key cannot see is
the content behind an unchanged image path: replace image files in place and the cache must be cleared.

An entry is ``root/<sha256>/`` holding ``dense.npy`` (V, N, HW, D), ``global.npy`` (V, N, D) in the storage
dtype (float16 by default: half the disk and page cache), ``valid.npy`` (N,) (False for images skipped as
unreadable under ``on_bad_image: skip``) and ``meta.json`` (key, shapes, dtype, creation time). It is written
in a temporary sibling directory and renamed into place, so a concurrent reader sees a whole entry or none.
Arrays are memory-mapped when read. Features are computed in float32 (eval mode, no autograd).

One writer per entry: the processes of a machine that miss the same entry (trials of a sweep) take turns on a
lock file (``root/.locks/``); the first computes, the others find its entry when their turn comes. Under a
``torch.distributed`` group the ranks compute an entry together: rank r encodes the r-th contiguous block of
items, then the blocks are broadcast so that every rank holds (and publishes on its machine) the whole entry,
bit for bit what one process computes. Only rank 0 takes the lock, and the group goes ahead once it holds it.
A remote store (another level shared by machines) also serialises them: rank 0 holds its ``computing`` lease.

Precision: float32 entries reproduce ``model(images)`` to 1e-5 on the logits (the same operations run; in
practice bit for bit). Float16 rounds every feature with a relative error of at most 2**-11, which moves a
cosine by about as much, so a logit ``s * cos`` moves by about ``logit_scale * 2**-11`` (1e-2 at the default
scale of 20): that is the documented tolerance, and the tests assert it. Measured on the tiny ViT and ResNet
models (sarl and global heads): at most 2.4e-3. The ``dualcoop`` head multiplies by DualCoOp's further factor 5
(5 * 20 * cos), so its bound is 5x that (5e-2); measured 6.9e-3. ``cache.dtype: float32`` is exact at twice the
size.

Random augmentation cannot be cached (every epoch draws a new crop). ``views=K`` caches K *fixed* augmented
views instead: view v of item i is the training transform run under a torch generator seeded from
(seed, v, i), so it is reproducible on any machine and independent of batch order or loader workers.
``FeatureDataset.set_epoch(e)`` serves view ``e % K`` in epoch e: every epoch sees one whole view of the data
set (as an augmented epoch does), and K epochs cycle through all of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from open_clip.transformer import QuickGELU
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

log = logging.getLogger("sarl.features")

FORMAT_VERSION = 1
META_FILE = "meta.json"
ARRAY_FILES = ("dense.npy", "global.npy", "valid.npy")
STORAGE_DTYPES = ("float16", "float32")


# ------------------------------------------------------------------------------------------------ the key
def weights_digest(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def items_digest(paths: Sequence[str]) -> str:
    """sha256 of a data set's item list (image paths or generated names, in order)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_key(model: nn.Module, dataset: Any, *, split: str, kind: str | None = None, root: str | None = None,
              options: Mapping[str, Any] | None = None, views: int = 1, seed: int = 0, dtype: str = "float16",
              weights: str | None = None) -> dict[str, Any]:
    """Every input the cached features of ``dataset`` under ``model`` depend on, as plain JSON data.

    Args:
        model: a ``SARLModel`` (``config.clip``, ``config.image_size`` and the ``visual`` tower are read).
        dataset: a ``MultiLabelDataset`` (``image_paths``, ``categories``, ``transform``).
        split, kind, root, options: the data set's identity as the job names it.
        views: fixed augmented views (1: the transform once); seed: their seed; dtype: storage dtype.
        weights: ``weights_digest(model.visual)`` if already computed (hashing a large tower takes a moment).
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}; got {dtype!r}")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    config = model.config
    return {
        "version": FORMAT_VERSION,
        "data": {"kind": kind, "root": None if root is None else str(root), "split": split,
                 "options": dict(options or {}), "categories": list(dataset.categories),
                 "items": {"count": len(dataset), "sha256": items_digest(dataset.image_paths)}},
        "backbone": config.clip,
        "weights": weights or weights_digest(model.visual),
        "image_size": int(config.image_size),
        "transform": {"repr": repr(dataset.transform), "views": int(views), "seed": int(seed)},
        "dtype": dtype,
        # Dense features with DualCoOp's mean token are (1 + HW) tokens: never read an entry of the other shape.
        # Only set when true, so entries of the location-only features keep their names.
        **({"mean_token": True} if getattr(model.visual, "mean_token", False) else {}),
        # The activation is no tensor, so the weights digest cannot see it; set only when true (GELU entries and
        # ResNet towers, whose visual side has no GELU, keep their names).
        **({"quick_gelu": True} if any(isinstance(m, QuickGELU) for m in model.visual.modules()) else {}),
    }


def _canonical(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


def key_digest(key: Mapping[str, Any]) -> str:
    """The entry name: sha256 hex of the key's canonical JSON."""
    return hashlib.sha256(_canonical(key).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ entries
@dataclass
class Features:
    """One cache entry, memory-mapped: dense (V, N, HW, D), global (V, N, D), valid (N,), and its metadata."""

    path: Path
    dense: np.ndarray
    global_: np.ndarray
    valid: np.ndarray
    meta: dict[str, Any]

    @property
    def views(self) -> int:
        return int(self.dense.shape[0])

    def __len__(self) -> int:
        return int(self.dense.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.dense.nbytes + self.global_.nbytes + self.valid.nbytes)

    @classmethod
    def open(cls, path: str | Path) -> Features:
        path = Path(path)
        meta = json.loads((path / META_FILE).read_text())
        dense, glob, valid = (np.load(path / name, mmap_mode="r") for name in ARRAY_FILES)
        return cls(path, dense, glob, valid, meta)


class RemoteStore(Protocol):
    """A second level behind the local directory (the platform's S3 store); ``sarl.model`` knows no S3."""

    def fetch(self, digest: str, local_dir: Path) -> bool:
        """Copy entry ``digest`` into ``local_dir`` if the store has a complete one; whether it did."""

    def push(self, digest: str, local_dir: Path) -> None:
        """Store the complete local entry ``local_dir`` as ``digest``."""

    def computing(self, digest: str) -> contextlib.AbstractContextManager[None]:
        """Held while this process computes entry ``digest``, so that one process of all those sharing the store
        computes it; entering returns once the store holds the entry (the caller then looks again) or this
        process may compute it."""


class FeatureCache:
    """Cached visual features under a local directory, one sub-directory per key digest.

    Args:
        root: local directory (created on first write); ``~`` is expanded.
        remote: optional second level (e.g. S3): consulted on a local miss, filled after computing.
    """

    def __init__(self, root: str | Path, remote: RemoteStore | None = None) -> None:
        self.root = Path(root).expanduser()
        self.remote = remote

    def path(self, digest: str) -> Path:
        return self.root / digest

    def load(self, key: Mapping[str, Any]) -> Features | None:
        """The entry for ``key`` if this directory holds it (a complete one: ``meta.json`` is written last)."""
        path = self.path(key_digest(key))
        if not (path / META_FILE).is_file():
            return None
        features = Features.open(path)
        if features.meta.get("key") != json.loads(_canonical(key)):
            raise ValueError(f"feature cache entry {path} holds another key (corrupt or edited); delete it")
        return features

    def get_or_compute(self, model: nn.Module, dataset: Dataset, key: Mapping[str, Any], batch_size: int = 64,
                       device: torch.device | str = "cpu", num_workers: int = 0,
                       progress: bool = False) -> tuple[Features, bool]:
        """The entry for ``key``, computing it on a miss; returns ``(features, hit)``.

        ``views``, ``seed`` and ``dtype`` are read from ``key`` (see ``cache_key``), so the entry always matches
        its name. A hit is a local entry or one the remote store had; both are logged with the digest, the
        number of images, the size and the seconds taken. Under a ``torch.distributed`` group every rank calls
        it: a miss on any rank is computed by all of them, one block of items each (see the module doc), and
        ``hit`` is the same on every rank.
        """
        start = time.perf_counter()
        digest = key_digest(key)
        rank, world = _rank_world()
        features, where = self._lookup(key, digest)
        hit = _on_every_rank(features is not None, world)
        if not hit:
            with (self._writer_lock(digest) if rank == 0 else contextlib.nullcontext(),
                  self.remote.computing(digest) if rank == 0 and self.remote else contextlib.nullcontext()):
                if world > 1:
                    torch.distributed.barrier()  # rank 0 holds the lock: everyone looks again
                if features is None:
                    features, where = self._lookup(key, digest)  # written by another process meanwhile?
                hit = _on_every_rank(features is not None, world)
                if not hit:
                    features = self._compute(model, dataset, key, digest, batch_size, device, num_workers,
                                             progress, rank, world)
                    if self.remote is not None and rank == 0:
                        self._push(digest, features)
        seconds = time.perf_counter() - start
        log.info("feature cache %s%s %s: %d images x %d view(s), %.1f MB, %.2f s%s", "hit" if hit else "miss",
                 f" ({where})" if hit else "", digest[:16], len(features), features.views,
                 features.nbytes / 2**20, seconds, f" (rank {rank} of {world})" if world > 1 else "")
        return features, hit

    def _lookup(self, key: Mapping[str, Any], digest: str) -> tuple[Features | None, str]:
        features = self.load(key)
        if features is None and self.remote is not None:
            return self._fetch(digest, key), "remote"
        return features, "local"

    def _push(self, digest: str, features: Features) -> None:
        try:
            self.remote.push(digest, features.path)
        except Exception as exc:  # a cache upload failing must not fail training: warn, keep the local copy
            log.warning("feature cache: could not store %s remotely (%s: %s); other machines will "
                        "compute it again", digest[:16], type(exc).__name__, exc)

    @contextlib.contextmanager
    def _writer_lock(self, digest: str) -> Iterator[None]:
        """The entry's lock among the processes of this machine (``flock``; released if the holder dies)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / digest[:32], "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("feature cache %s: another process is computing it; waiting for it", digest[:16])
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -------------------------------------------------------------------------------------------- internals
    def _staging(self, digest: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f".tmp-{digest[:16]}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def _publish(self, staging: Path, digest: str) -> Features:
        """Rename a complete staging directory into place; if another process got there first, keep theirs."""
        target = self.path(digest)
        try:
            if target.is_dir() and not (target / META_FILE).is_file():
                shutil.rmtree(target, ignore_errors=True)  # not written by this class (which renames whole entries)
            os.rename(staging, target)
        except OSError:
            if not (target / META_FILE).is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Features.open(target)

    def _fetch(self, digest: str, key: Mapping[str, Any]) -> Features | None:
        staging = self._staging(digest)
        try:
            complete = self.remote.fetch(digest, staging) and (staging / META_FILE).is_file()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not complete:
            shutil.rmtree(staging, ignore_errors=True)
            return None
        self._publish(staging, digest)
        return self.load(key)

    def _compute(self, model: nn.Module, dataset: Dataset, key: Mapping[str, Any], digest: str, batch_size: int,
                 device: torch.device | str, num_workers: int, progress: bool, rank: int = 0,
                 world_size: int = 1) -> Features:
        staging = self._staging(digest)
        try:
            transform = key["transform"]
            shapes = compute_features(model, dataset, staging, views=transform["views"], seed=transform["seed"],
                                      dtype=key["dtype"], batch_size=batch_size, device=device,
                                      num_workers=num_workers, progress=progress, rank=rank, world_size=world_size)
            meta = {"key": json.loads(_canonical(key)), "digest": digest, **shapes, "dtype": key["dtype"],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (staging / META_FILE).write_text(json.dumps(meta, indent=2))  # last: marks the entry complete
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self._publish(staging, digest)


# ------------------------------------------------------------------------------------------------ computing
def view_seed(seed: int, view: int, index: int) -> int:
    """The torch seed of view ``view`` of item ``index``: independent streams for every (seed, view, item)."""
    return int(np.random.SeedSequence([seed, view, index]).generate_state(1, np.uint64)[0] >> 1)


class _SeededView(Dataset):
    """Items ``(index, item)`` of one fixed view: the dataset's transform runs under a per-item seed."""

    def __init__(self, dataset: Dataset, view: int, seed: int) -> None:
        self.dataset, self.view, self.seed = dataset, view, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(self.seed, self.view, index))
            return index, self.dataset[index]


def _collate_indexed(batch: list[tuple[int, Any]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    kept = [(i, item[0]) for i, item in batch if item is not None]
    if not kept:
        return torch.empty(0, dtype=torch.long), None
    return torch.tensor([i for i, _ in kept]), torch.stack([image for _, image in kept])


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _on_every_rank(flag: bool, world: int) -> bool:
    """``flag`` and-ed over the ranks of the group (``flag`` itself without one)."""
    if world == 1:
        return flag
    seen = [None] * world
    torch.distributed.all_gather_object(seen, bool(flag))
    return all(seen)


EXCHANGE_CHUNK_BYTES = 64 * 2**20  # per broadcast while ranks exchange their blocks of an entry


class _EntryArrays:
    """The memory-mapped arrays of an entry being written, opened once the feature shapes are known."""

    def __init__(self, out_dir: Path, views: int, n: int, dtype: np.dtype) -> None:
        self.out_dir, self.views, self.n, self.dtype = out_dir, views, n, dtype
        self.dense: np.ndarray | None = None
        self.glob: np.ndarray | None = None
        self.valid = np.zeros(n, dtype=bool)

    @property
    def row_shapes(self) -> tuple[list[int], list[int]] | None:
        return None if self.dense is None else (list(self.dense.shape[2:]), list(self.glob.shape[2:]))

    def open(self, dense_row: Sequence[int], glob_row: Sequence[int]) -> None:
        if self.dense is None:
            self.dense = np.lib.format.open_memmap(self.out_dir / "dense.npy", mode="w+", dtype=self.dtype,
                                                   shape=(self.views, self.n, *dense_row))
            self.glob = np.lib.format.open_memmap(self.out_dir / "global.npy", mode="w+", dtype=self.dtype,
                                                  shape=(self.views, self.n, *glob_row))


def _exchange(arrays: _EntryArrays, bounds: np.ndarray, rank: int, world: int, device: torch.device) -> None:
    """Broadcast each rank's block of rows (``bounds[r]:bounds[r+1]``) to the others, as raw bytes in chunks of
    at most ``EXCHANGE_CHUNK_BYTES`` (on the GPU under NCCL, which broadcasts only device tensors)."""
    dist = torch.distributed
    shapes: list[Any] = [None] * world
    dist.all_gather_object(shapes, arrays.row_shapes)
    known = next((s for s in shapes if s is not None), None)
    if known is None:
        raise ValueError("every image of the data set was unreadable; nothing to cache")
    arrays.open(*known)
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def send(block: np.ndarray, src: int) -> np.ndarray:
        raw = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        buffer = torch.from_numpy(raw.copy()) if rank == src else torch.empty(raw.size, dtype=torch.uint8)
        buffer = buffer.to(on)
        dist.broadcast(buffer, src)
        return buffer.cpu().numpy().view(block.dtype).reshape(block.shape)

    for src in range(world):
        lo, hi = int(bounds[src]), int(bounds[src + 1])
        if hi == lo:
            continue
        arrays.valid[lo:hi] = send(arrays.valid[lo:hi], src)
        for array in (arrays.dense, arrays.glob):
            rows = max(1, EXCHANGE_CHUNK_BYTES // max(1, array[0, 0].nbytes))
            for view in range(arrays.views):
                for a in range(lo, hi, rows):
                    b = min(hi, a + rows)
                    block = send(array[view, a:b], src)
                    if rank != src:
                        array[view, a:b] = block


@torch.no_grad()
def compute_features(model: nn.Module, dataset: Dataset, out_dir: str | Path, views: int = 1, seed: int = 0,
                     dtype: str = "float16", batch_size: int = 64, device: torch.device | str = "cpu",
                     num_workers: int = 0, progress: bool = False, rank: int = 0,
                     world_size: int = 1) -> dict[str, Any]:
    """Write ``dense.npy``, ``global.npy`` and ``valid.npy`` for ``dataset`` into ``out_dir``; returns the shapes.

    The model runs in eval mode (restored afterwards) in float32; arrays are filled batch by batch through
    memory maps, so a data set larger than memory can be cached. Items the dataset returns as ``None``
    (unreadable images it was told to skip) keep zero rows and ``valid = False``.

    With ``world_size`` > 1 every rank of the ``torch.distributed`` group calls it with its own ``rank`` and
    ``out_dir``: rank r encodes items ``[r*N//W, (r+1)*N//W)``, then the ranks exchange their blocks (``_exchange``),
    so each ``out_dir`` ends up with the whole entry. View seeds follow the item's index in ``dataset``, so the
    arrays are those one process computes.
    """
    out_dir, device = Path(out_dir), torch.device(device)
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot cache features of an empty data set")
    bounds = np.arange(world_size + 1) * n // world_size
    mine = list(range(int(bounds[rank]), int(bounds[rank + 1])))
    arrays = _EntryArrays(out_dir, views, n, np.dtype(dtype))
    was_training = model.training
    model.eval()
    try:
        for view in range(views):
            # Its own generator: a loader draws a base seed, which must not shift the caller's global RNG
            # (a run that hits the cache must train exactly like one that missed).
            loader = DataLoader(Subset(_SeededView(dataset, view, seed), mine), batch_size=batch_size,
                                shuffle=False, num_workers=num_workers, collate_fn=_collate_indexed,
                                generator=torch.Generator())
            desc = f"caching features (view {view + 1}/{views})" if views > 1 else "caching features"
            for index, images in tqdm(loader, desc=desc, disable=not progress or not mine, leave=False,
                                      dynamic_ncols=True):
                if images is None:
                    continue
                dense, glob = model.encode_image(images.to(device, dtype=torch.float32))
                arrays.open(dense.shape[1:], glob.shape[1:])
                rows = index.numpy()
                arrays.dense[view, rows] = dense.float().cpu().numpy().astype(arrays.dtype)
                arrays.glob[view, rows] = glob.float().cpu().numpy().astype(arrays.dtype)
                arrays.valid[rows] = True
    finally:
        model.train(was_training)
    if world_size > 1:
        _exchange(arrays, bounds, rank, world_size, device)
    if arrays.dense is None:
        raise ValueError("every image of the data set was unreadable; nothing to cache")
    arrays.dense.flush()
    arrays.glob.flush()
    np.save(out_dir / "valid.npy", arrays.valid)
    return {"views": views, "num_items": n, "dense_shape": list(arrays.dense.shape),
            "global_shape": list(arrays.glob.shape), "num_valid": int(arrays.valid.sum())}


# ------------------------------------------------------------------------------------------------ reading
class FeatureDataset(Dataset):
    """Cached features as a training or evaluation set: items ``((dense, global), target)``.

    Args:
        features: a cache entry.
        labels: (len(rows), C) targets in {1, 0, -1}, e.g. the image dataset's ``labels`` (partial mask included).
        categories: the C category names.
        rows: entry rows, in item order (a train or validation subset of a cached split); default all.
        dtype: tensors served as float32 (CPU models; the default) or float16 (halves host-to-GPU traffic).

    An item whose image was unreadable is ``None``, dropped by ``collate_skip_bad`` like the image dataset's.
    Loaders over it need no worker processes (a row is a copy out of the page cache); with ``num_workers > 0``
    workers would keep the view of the epoch they started in, so use 0 with ``views > 1``.
    """

    def __init__(self, features: Features, labels: np.ndarray, categories: Sequence[str],
                 rows: np.ndarray | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.features = features
        self.rows = np.arange(len(features), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int8)
        if self.labels.shape[0] != len(self.rows):
            raise ValueError(f"{self.labels.shape[0]} label rows for {len(self.rows)} items")
        self.categories = list(categories)
        self.dtype = dtype
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def view(self) -> int:
        return self.epoch % self.features.views

    def set_epoch(self, epoch: int) -> None:
        """Serve view ``epoch % views`` from now on (the engine calls this at the start of every epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"FeatureDataset(num_items={len(self)}, num_classes={self.num_classes}, "
                f"views={self.features.views}, entry={self.features.path.name[:16]})")

    def target(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.labels[index].astype(np.float32))

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        row, view = int(self.rows[index]), self.view
        if not self.features.valid[row]:
            return None
        dense = torch.from_numpy(np.array(self.features.dense[view, row])).to(self.dtype)
        glob = torch.from_numpy(np.array(self.features.global_[view, row])).to(self.dtype)
        return (dense, glob), self.target(index)

    def subset(self, indices: Sequence[int] | np.ndarray) -> FeatureDataset:
        """The items at ``indices`` (in that order), labels included; e.g. one worker's evaluation shard."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        new = FeatureDataset(self.features, self.labels[idx], self.categories, self.rows[idx], self.dtype)
        new.epoch = self.epoch
        return new


__all__ = ["FeatureCache", "FeatureDataset", "Features", "RemoteStore", "cache_key", "compute_features",
           "key_digest", "view_seed", "weights_digest"]
