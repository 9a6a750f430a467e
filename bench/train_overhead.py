"""Ray Train's overhead: the plain engine loop in one process vs Ray Train with 1 and 2 workers.

Same model (tiny), data (synthetic), batch size and number of epochs in every column. Throughput counts
training samples over the steady-state epoch time (train + validation, as every epoch does both); start-up
(cluster, worker group, process group, data and model construction) is reported apart.
Target: Ray Train with 1 worker at >= 0.9x the plain loop's samples/s.

    python bench/train_overhead.py [--epochs 3] [--images 1200]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from sarl.model import engine
from sarl.model.distributed import seed_everything
from sarl.model.experiment import build_components, make_loader, prepare_data
from sarl.platform.cluster import init_ray
from sarl.platform.job import load_job
from sarl.platform.train import run_training


def overrides(args) -> list[str]:
    return [f"train.epochs={args.epochs}", f"data.options.num_images={args.images}", "train.progress=false",
            "data.num_workers=0"]


def plain(args) -> dict[str, float]:
    """The engine loop in this process, as ``sarl.model.experiment.fit`` runs it."""
    start = time.perf_counter()
    torch.set_num_threads(2)
    cfg = load_job("jobs/demo.yaml", overrides(args))
    seed_everything(cfg.train.seed)
    splits = prepare_data(cfg, tempfile.mkdtemp())
    train = make_loader(splits.train, cfg.train.batch_size, True, 0, cfg.train.seed, drop_last=True)
    val = make_loader(splits.val, cfg.train.eval_batch_size, False, 0)
    model, loss_fn, optimizer, scheduler = build_components(cfg, splits.categories, len(train))
    startup = time.perf_counter() - start
    samples, seconds, loop_rates = 0, 0.0, []
    for epoch in range(1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        stats = engine.train_one_epoch(model, train, loss_fn, optimizer, "cpu", epoch, scheduler, progress=False)
        engine.evaluate(model, val, "cpu", progress=False)
        seconds += time.perf_counter() - t0
        samples += stats["samples"]
        loop_rates.append(stats["samples_per_s"])
    return {"samples_per_s": samples / seconds, "loop_samples_per_s": sum(loop_rates) / len(loop_rates),
            "startup_s": startup, "samples": samples}


def ray_train(args, workers: int) -> dict[str, float]:
    job = load_job("jobs/demo.yaml", overrides(args) + [
        f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={2 // workers}",
        f"run.storage_path={tempfile.mkdtemp()}", f"run.name=bench-{workers}", f"run.keep_checkpoints={args.epochs}"])
    start = time.perf_counter()
    result = run_training(job)
    wall = time.perf_counter() - start
    history = result["history"]
    seconds = sum(row["epoch_seconds"] for row in history)
    samples = sum(row["samples"] for row in history)
    loop = sum(row["samples_per_s"] for row in history) / len(history)
    return {"samples_per_s": samples / seconds, "loop_samples_per_s": loop, "startup_s": wall - seconds,
            "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=1200)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = {"plain loop (1 process, 2 threads)": plain(args)}
    t0 = time.perf_counter()
    init_ray(num_cpus=2, dashboard=False)  # on 2 cores the dashboard's own CPU would be counted as overhead
    ray_init = time.perf_counter() - t0
    rows["Ray Train, 1 worker x 2 CPUs"] = ray_train(args, 1)
    rows["Ray Train, 2 workers x 1 CPU"] = ray_train(args, 2)
    base = rows["plain loop (1 process, 2 threads)"]
    print(f"\ntiny model, synthetic {args.images} images, {args.epochs} epochs, batch 32 per worker, "
          f"{torch.get_num_threads()} threads available")
    print("training loop = train_one_epoch alone; whole epoch = training + validation (+ the checkpoint report on "
          "Ray)")
    print(f"{'':<36} {'loop samples/s':>15} {'ratio':>7} {'epoch samples/s':>16} {'ratio':>7} {'start-up s':>11}")
    for name, row in rows.items():
        loop, epoch = row["loop_samples_per_s"], row["samples_per_s"]
        print(f"{name:<36} {loop:>15.1f} {loop / base['loop_samples_per_s']:>6.2f}x"
              f" {epoch:>16.1f} {epoch / base['samples_per_s']:>6.2f}x {row['startup_s']:>11.1f}")
    print(f"(ray.init of the local cluster, without dashboard: {ray_init:.1f} s, not counted above)")


if __name__ == "__main__":
    main()
