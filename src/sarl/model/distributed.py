"""What data-parallel training needs from torch.distributed, without Ray: evaluation shards, one RNG stream per
rank (saved in checkpoints and restored on resume), ranks that step or skip together, and epoch numbers over all
ranks. Every function works without a process group too (one process: world size 1).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (this process's, every rank alike)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def is_distributed() -> bool:
    """Whether this worker is one of several in a torch.distributed process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_rng_states(device: torch.device | None = None) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it), so each rank resumes its own."""
    mine = rng_state(device)
    if not is_distributed():
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
    if not is_distributed():
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
