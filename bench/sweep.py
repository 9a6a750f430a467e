"""What the feature cache and ASHA save in a sweep, printed side by side in one run.

1. Wall time of one trial (a ``sarl train`` run on Ray Train, 1 worker) of a frozen ``rn50`` (random weights,
   224 px, a few hundred generated images): without the cache, with a cold cache (the features are computed
   and stored) and with a warm cache (what every later trial of a sweep pays). Target: warm >= 5x faster.
2. The same sweep (same sampled configurations) with ASHA and without early stopping: total trial-epochs,
   best validation mAP and wall time.

    python bench/sweep.py [--quick] [--images N] [--epochs E] [--samples S]

Everything runs on a local Ray cluster started here; the trials and the cache live in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sarl.platform.cluster import init_ray
from sarl.platform.job import load_job
from sarl.platform.train import run_training
from sarl.platform.tune import load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[1]


def job_overrides(images: int, epochs: int, workdir: Path, cache: bool, cache_root: Path) -> list[str]:
    return [
        "name=bench-rn50", "model.name=rn50", "model.pretrained=null", "model.semantic_source=clip",
        "model.unfreeze=none", "data.kind=synthetic", "data.augment=none", "data.num_workers=0",
        f"data.options={{num_images: {images}, image_size: 224, seed: 0}}", f"train.epochs={epochs}",
        "train.batch_size=32", "train.eval_batch_size=64", "train.progress=false", "optim.name=adamw",
        "optim.lr=0.003", "scaling.num_workers=1", f"scaling.cpus_per_worker={os.cpu_count() or 2}",
        f"run.storage_path={workdir / 'runs'}", "run.keep_checkpoints=1",
        f"cache.enabled={str(cache).lower()}", f"cache.root={cache_root}",
    ]


def timed_trial(name: str, overrides: list[str]) -> dict:
    job = load_job(REPO / "jobs" / "demo.yaml", [*overrides, f"run.name={name}"])
    start = time.perf_counter()
    result = run_training(job)
    wall = time.perf_counter() - start
    epochs = result["history"]
    return {"wall": wall, "epoch_s": sum(e["epoch_seconds"] for e in epochs) / len(epochs),
            "val_mAP": result["metrics"]["val_mAP"], "hits": epochs[-1].get("cache_hits", 0),
            "misses": epochs[-1].get("cache_misses", 0)}


def sweep_file(path: Path, workdir: Path, cache_root: Path, images: int, epochs: int, samples: int,
               scheduler: str) -> Path:
    path.write_text(f"""
name: bench_{scheduler}
job: {REPO / "jobs" / "demo.yaml"}
overrides:
  model: {{name: rn50, pretrained: null, semantic_source: clip, unfreeze: none}}
  data: {{augment: none, num_workers: 0, options: {{num_images: {images}, image_size: 224, seed: 0}}}}
  train: {{epochs: {epochs}, batch_size: 32, eval_batch_size: 64, progress: false}}
  run: {{keep_checkpoints: 1, max_failures: 0}}
  scaling: {{torch_threads: 2}}
  cache: {{enabled: true, root: {cache_root}}}
space:
  loss.name: {{choice: [asl, wan, an, partial_bce]}}
  model.fusion: {{choice: [bilinear, additive, dot]}}
  optim.lr: {{loguniform: [0.0005, 0.02]}}
num_samples: {samples}
max_concurrent_trials: 1       # one trial at a time, using both cores (2-core machine)
scheduler: {{name: {scheduler}, grace_period: 1, reduction_factor: 3}}
search: {{name: random, seed: 0}}
resources: {{num_workers: 1, cpus_per_worker: 1.8}}
storage_path: {workdir / "tune"}
output_dir: {workdir / "results" / scheduler}
""")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images, epochs and samples (a smoke run)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=6)
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs, args.samples = 96, 2, 3
    workdir = Path(tempfile.mkdtemp(prefix="sarl-bench-sweep-"))
    cache_root = workdir / "cache"
    # With the dashboard: Train's placement-group cleaner needs its State API to free the resources of a trial
    # that Tune stopped; without it the next trial waits forever for the CPUs.
    init_ray(num_cpus=os.cpu_count() or 2, dashboard=True)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}; frozen rn50 (random weights), 224 px, "
          f"{args.images} generated images ({int(args.images * 0.9)} train / {args.images - int(args.images * 0.9)} "
          f"val), {args.epochs} epochs, 1 worker\n")
    try:
        rows = {
            "no cache": timed_trial("no-cache", job_overrides(args.images, args.epochs, workdir, False, cache_root)),
            "cache, cold": timed_trial("cold", job_overrides(args.images, args.epochs, workdir, True, cache_root)),
            "cache, warm": timed_trial("warm", job_overrides(args.images, args.epochs, workdir, True, cache_root)),
        }
        base = rows["no cache"]
        print("one trial (sarl train on Ray Train, start-up included)")
        print(f"{'':<13} {'wall s':>8} {'s/epoch':>8} {'val mAP':>8} {'hits':>5} {'misses':>6} {'speed-up':>9}")
        for name, r in rows.items():
            print(f"{name:<13} {r['wall']:>8.1f} {r['epoch_s']:>8.2f} {r['val_mAP']:>8.2f} {r['hits']:>5} "
                  f"{r['misses']:>6} {base['wall'] / r['wall']:>8.2f}x")
        warm = base["wall"] / rows["cache, warm"]["wall"]
        print(f"warm cache vs no cache: {warm:.1f}x per trial (target >= 5x: {'met' if warm >= 5 else 'MISSED'}); "
              f"per epoch {base['epoch_s'] / rows['cache, warm']['epoch_s']:.0f}x\n")

        print(f"the same {args.samples} sampled configurations, ASHA against no early stopping (warm cache)")
        print(f"{'scheduler':<10} {'trials':>6} {'stopped':>8} {'trial-epochs':>13} {'best val mAP':>13} {'wall s':>8}")
        for scheduler in ("asha", "none"):
            sweep, job = load_sweep(sweep_file(workdir / f"{scheduler}.yaml", workdir, cache_root, args.images,
                                               args.epochs, args.samples, scheduler))
            start = time.perf_counter()
            trials = run_sweep(sweep, job)["trials"]
            wall = time.perf_counter() - start
            stopped = sum(t["status"] == "stopped early" for t in trials)
            best = max(t["best"] for t in trials if t["best"] is not None)
            print(f"{scheduler:<10} {len(trials):>6} {stopped:>8} {sum(t['epochs'] for t in trials):>13} "
                  f"{best:>13.2f} {wall:>8.1f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
