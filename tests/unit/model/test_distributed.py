"""The data-parallel helpers of ``sarl.model.distributed`` and the resume order of ``restore_train_state``, without
Ray: per-rank RNG streams, and the collectives over ranks on a real 2-process gloo group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sarl.model.checkpoint import restore_train_state, save_checkpoint
from sarl.model.config import from_dict
from sarl.model.distributed import StepTogether, global_train_stats, rng_state, seed_rank
from sarl.model.experiment import ExperimentConfig, build_components

CATEGORIES = ["circle", "square", "triangle"]


def _config() -> ExperimentConfig:
    return from_dict(ExperimentConfig, {"model": {"name": "tiny", "rank": 16}, "optim": {"name": "sgd", "lr": 0.003}})


def test_the_optimizer_state_is_loaded_where_the_parameters_are(tmp_path):
    """``restore_train_state`` moves the model before loading the optimizer state, so every state tensor sits with
    its parameter. A dtype stands in for the GPU here: ``Optimizer.load_state_dict`` casts state tensors to the
    parameter's device and dtype alike, and a later ``Module.to`` (``prepare_model``) moves neither. Loaded the
    old way (state first, then the move), the momentum buffers stay float32 beside float64 parameters."""
    job = _config()
    model, _, optimizer, scheduler = build_components(job, CATEGORIES, 4, 1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    save_checkpoint(model, tmp_path)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

    fresh, _, optimizer2, scheduler2 = build_components(job, CATEGORIES, 4, 1)
    restore_train_state(fresh, optimizer2, scheduler2, tmp_path, state, torch.float64)
    params = [p for g in optimizer2.param_groups for p in g["params"]]
    assert params and all(p.dtype == torch.float64 for p in params)
    for p in params:
        buffer = optimizer2.state[p]["momentum_buffer"]
        assert (buffer.device, buffer.dtype) == (p.device, p.dtype)
    assert scheduler2.last_epoch == scheduler.last_epoch


def test_every_rank_has_its_own_rng_stream_and_resumes_it():
    draws = []
    for rank in range(3):
        torch.manual_seed(7)  # what seed_everything(seed) left on every rank
        seed_rank(7, rank, 3, None)
        draws.append(torch.randint(0, 2**31, (4,)))
    assert len({tuple(d.tolist()) for d in draws}) == 3  # DataLoader base seeds differ between ranks
    torch.manual_seed(0)
    saved = [rng_state() for _ in range(2)]
    torch.randint(0, 2**31, (1,))
    saved[1] = rng_state()
    expected = torch.randint(0, 2**31, (4,))
    seed_rank(7, 1, 2, {"rng_per_rank": saved, "rng": saved[0]})
    assert torch.equal(torch.randint(0, 2**31, (4,)), expected)


def _collectives(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        # Rank 0 had 3 samples at loss 1.0, rank 1 had 1 sample at loss 5.0 and twice the time per sample.
        stats = [{"loss": 1.0, "samples": 3, "samples_per_s": 3.0, "skipped_images": 0, "lr": 0.1},
                 {"loss": 5.0, "samples": 1, "samples_per_s": 0.5, "skipped_images": 2, "lr": 0.1}][rank]
        merged = global_train_stats(stats, torch.device("cpu"))
        # Rank 1's second batch is all unreadable: both ranks must skip that step (and only that one).
        batches = [[(torch.ones(2, 1), torch.ones(2, 1), 0)] * 3,
                   [(torch.ones(2, 1), torch.ones(2, 1), 0), (torch.empty(0), torch.empty(0), 2),
                    (torch.ones(1, 1), torch.ones(1, 1), 1)]][rank]
        steps = [int(b[0].shape[0]) for b in StepTogether(batches, torch.device("cpu"))]
        Path(out, f"{rank}.json").write_text(json.dumps({"stats": merged, "steps": steps}))
    finally:
        torch.distributed.destroy_process_group()


def test_epoch_numbers_and_skipped_steps_are_agreed_over_ranks(tmp_path):
    # Forked: a spawned process would import this module (torch, Ray, open_clip) again, for tens of seconds.
    mp.start_processes(_collectives, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for r in results:  # the same numbers on every rank
        assert r["stats"]["loss"] == pytest.approx((3 * 1.0 + 1 * 5.0) / 4)  # weighted by samples, not rank 0's
        assert r["stats"]["samples"] == 4 and r["stats"]["skipped_images"] == 2
        assert r["stats"]["samples_per_s"] == pytest.approx(4 / 2.0)  # all samples over the slowest rank's time
    assert results[0]["steps"] == [2, 0, 2] and results[1]["steps"] == [2, 0, 1]


