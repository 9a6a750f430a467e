"""Bulk prediction throughput: ``sarl predict`` on Ray Data against a plain single-process loop, side by side.

Same files (generated PNGs, 320x240), same model (``rn50`` with random weights at 224 px by default; ``tiny``
for a smoke run), same CPUs. Modes:

1. the plain loop in this process: read, decode and transform each file (``ImageScorer.preprocess``, as Serve
   does), score batches of ``--batch-size`` (``ImageScorer.score``);
2. ``sarl predict`` (``run_predict``) with 1 scoring actor, on a local Ray cluster of this machine's CPUs;
3. the same with 2 scoring actors.

Each mode reports images/s over the whole run (start-up included: loading the model, Ray Data's planning) and
images/s of its steady part (the plain loop has no start-up to speak of; for (2) and (3) the run's own time
minus the time to its first shard, which includes the actors loading the model). Ratios are to (1).

    python bench/predict.py [--model rn50|tiny] [--images 256] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sarl.model import create_model
from sarl.model.checkpoint import save_checkpoint

CATEGORIES = [f"category {i}" for i in range(20)]
MODELS = {"tiny": {}, "rn50": {"pretrained": None, "semantic_source": "clip"}}


def make_files(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def plain_loop(checkpoint: Path, paths: list[Path], batch_size: int) -> dict[str, float]:
    from sarl.platform.serve.scoring import ImageScorer

    started = time.perf_counter()
    scorer = ImageScorer(str(checkpoint), "cpu")
    bound = scorer.bind(scorer.model.vocabulary)
    loaded = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            scorer.score(bound, [scorer.preprocess(p.read_bytes()) for p in paths[i:i + batch_size]])
    done = time.perf_counter()
    return {"total": len(paths) / (done - started), "steady": len(paths) / (done - loaded)}


def ray_predict(checkpoint: Path, folder: Path, output: Path, actors: int, batch_size: int, cpus: int,
                shard_size: int) -> dict[str, float]:
    from sarl.platform.predict import PredictConfig, run_predict

    first_shard: list[float] = []
    started = time.perf_counter()
    import threading

    def watch() -> None:
        while not first_shard:
            if any(output.glob("part-*")):
                first_shard.append(time.perf_counter())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    summary = run_predict(PredictConfig(checkpoint=str(checkpoint), input=str(folder), output=str(output),
                                        batch_size=batch_size, actors=actors, shard_size=shard_size,
                                        cpus_per_actor=cpus / (2 * actors), decode_cpus=0.5, overwrite=True))
    done = time.perf_counter()
    first_shard.append(done)
    n = summary["this_run"]["scored"]
    steady_images = n - shard_size if n > shard_size else n
    steady = steady_images / max(done - first_shard[0], 1e-9) if n > shard_size else float("nan")
    return {"total": n / (done - started), "steady": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="rn50")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.cpus)
    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    try:
        torch.manual_seed(0)
        model = create_model(args.model, CATEGORIES, **MODELS[args.model]).eval()
        checkpoint = save_checkpoint(model, tmp / "checkpoint")
        del model
        paths = make_files(tmp / "images", args.images)
        print(f"machine: {args.cpus} CPUs, torch {torch.__version__}; model {args.model} at "
              f"{224 if args.model == 'rn50' else 64} px; {args.images} PNGs of 320x240; batch {args.batch_size}",
              flush=True)
        results = {"(1) plain loop, 1 process": plain_loop(checkpoint, paths, args.batch_size)}
        import ray

        from sarl.platform.cluster import init_ray

        init_ray(num_cpus=args.cpus, dashboard=False)
        shard = max(args.batch_size, args.images // 8)
        for actors in (1, 2):
            results[f"({actors + 1}) sarl predict, {actors} actor{'s' if actors > 1 else ''}"] = ray_predict(
                checkpoint, tmp / "images", tmp / f"out{actors}", actors, args.batch_size, args.cpus, shard)
        ray.shutdown()
        base = results["(1) plain loop, 1 process"]
        print(f"\n{'mode':<30} {'images/s':>9} {'ratio':>6}   {'steady images/s':>15} {'ratio':>6}")
        for name, r in results.items():
            print(f"{name:<30} {r['total']:>9.2f} {r['total'] / base['total']:>5.2f}x   {r['steady']:>15.2f} "
                  f"{r['steady'] / base['steady']:>5.2f}x")
        sys.stdout.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
