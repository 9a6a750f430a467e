"""Bulk prediction throughput: ``sarl predict`` on Ray Data against a plain single-process loop, side by side.

Same files (generated PNGs, 320x240), same model (``rn50`` with random weights at 224 px by default; ``tiny``
for a smoke run), same CPUs. Modes:

1. the plain loop in this process: read, decode and transform each file (``ImageScorer.preprocess``, as Serve
   does), score batches of ``--batch-size`` (``ImageScorer.score``), on torch threads of all ``--cpus``;
2. ``sarl predict`` (``run_predict``) with 1 scoring actor, on a local Ray cluster of this machine's CPUs;
3. the same with 2 scoring actors.

Every mode has the machine's CPUs: an actor of (2) and (3) asks for ``--cpus`` / actors CPUs (so runs that many
torch threads, as Ray sets them) and, on CPUs, decodes its own images (``decode_cpus`` follows ``cpus_per_actor``,
so Ray Data fuses the two stages, as ``sarl predict`` does by default on CPU actors). Until issue 18 the bench
gave the actors half the CPUs (1 actor: 1 CPU, 1 torch thread, against the loop's 2) and the decode tasks 0.5 CPU
each; ``--old-shares`` runs that split again. The local cluster's workers run at niceness 0, as the loop does
(``RAY_worker_niceness``; at Ray's default, 15, any other process on a shared machine slowed the actors only).

Each mode reports images/s over the whole run (start-up included: loading the model, Ray Data's planning, the
actors' processes importing torch and open_clip; the loop's imports are done before its clock starts) and
images/s of its steady part: the plain loop's after loading the model; for (2) and (3), between the first shard
written and the last one before the run's end (Ray Data hands an actor's output on about when its next task
ends, so the end flushes a batch per actor at once). "from 1st shard" is the measure used before issue 18: the
first shard to the end, which credited that window with the images the lag had hidden before it. Ratios are to
(1). "start-up s" is a run's time beyond its images at its steady rate; the last lines say from how many images
on a mode's lower cost per image pays back its longer start-up.

Last, the floor of that start-up: how long two fresh actors on the same cluster take to come up empty, and to
import what a scoring actor imports before its constructor runs (Ray Data unpickles the map function, which
imports ``sarl.platform.predict``: torch, open_clip with torchvision and timm; and ``ray.data``), before any model
is loaded; and how many images the 2 actors' lower cost per image needs to pay back those imports alone.

    python bench/predict.py [--model rn50|tiny] [--images 256] [--batch-size 16] [--cpus N] [--old-shares]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import threading
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
                shard_size: int, old_shares: bool = False) -> dict[str, float]:
    from sarl.platform.predict import PredictConfig, run_predict

    shards: list[float] = []  # when each shard file appeared
    finished = threading.Event()

    def watch() -> None:
        while not finished.is_set():
            shards.extend([time.perf_counter()] * (len(list(output.glob("part-*"))) - len(shards)))
            finished.wait(0.05)

    started = time.perf_counter()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    shares = {"cpus_per_actor": cpus / (2 * actors), "decode_cpus": 0.5} if old_shares else {
        "cpus_per_actor": cpus / actors}
    summary = run_predict(PredictConfig(checkpoint=str(checkpoint), input=str(folder), output=str(output),
                                        batch_size=batch_size, actors=actors, shard_size=shard_size, **shares,
                                        overwrite=True))
    done = time.perf_counter()
    finished.set()
    watcher.join()
    n = summary["this_run"]["scored"]
    # Ray Data hands an actor's output on about when its next task ends, so the first shard shows up one batch
    # per actor late and the run's end flushes the rest at once: counting from the first shard to the end
    # credits the window with images scored before it. The steady rate is taken between the first shard and the
    # last one before the end's flush, both late by the same lag.
    steady = shards[:-1]
    return {"total": n / (done - started),
            "steady": shard_size * (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 2 else float("nan"),
            "from_first_shard": (n - shard_size) / (done - shards[0]) if len(shards) > 1 else float("nan")}


def actors_up(actors: int, cpus: int, modules: tuple[str, ...]) -> float:
    """Seconds until ``actors`` fresh actors of ``cpus / actors`` CPUs each have imported ``modules``."""
    import ray

    @ray.remote
    class Importer:
        def __init__(self, names: tuple[str, ...]) -> None:
            for name in names:
                importlib.import_module(name)

        def ready(self) -> None:
            return None

    started = time.perf_counter()
    handles = [Importer.options(num_cpus=cpus / actors).remote(modules) for _ in range(actors)]
    ray.get([handle.ready.remote() for handle in handles])
    seconds = time.perf_counter() - started
    for handle in handles:
        ray.kill(handle)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="rn50")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--old-shares", action="store_true", help="the CPU shares the bench gave before issue 18")
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
              f"{224 if args.model == 'rn50' else 64} px; {args.images} PNGs of 320x240; batch {args.batch_size}"
              f"{'; the old CPU shares' if args.old_shares else ''}", flush=True)
        results = {"(1) plain loop, 1 process": plain_loop(checkpoint, paths, args.batch_size)}
        import ray

        from sarl.platform.cluster import init_ray

        # The actors at the loop's niceness: at Ray's default, 15, any other process on the machine slowed them.
        os.environ.setdefault("RAY_worker_niceness", "0")
        init_ray(num_cpus=args.cpus, dashboard=False)
        shard = max(args.batch_size, args.images // 8)
        for actors in (1, 2):
            results[f"({actors + 1}) sarl predict, {actors} actor{'s' if actors > 1 else ''}"] = ray_predict(
                checkpoint, tmp / "images", tmp / f"out{actors}", actors, args.batch_size, args.cpus, shard,
                args.old_shares)
        floor = {"empty": actors_up(2, args.cpus, ()),
                 "imports": actors_up(2, args.cpus, ("ray.data", "sarl.platform.predict"))}
        ray.shutdown()
        base = results["(1) plain loop, 1 process"]
        print(f"\n{'mode':<30} {'images/s':>9} {'ratio':>6}   {'steady images/s':>15} {'ratio':>6}   "
              f"{'from 1st shard':>14} {'ratio':>6}   {'start-up s':>10}")
        def startup(r: dict[str, float]) -> float:
            """The run's time beyond its images at the steady rate: model loads, actor processes, their imports."""
            return args.images / r["total"] - args.images / r["steady"]

        for name, r in results.items():
            first = r.get("from_first_shard", base["steady"])
            print(f"{name:<30} {r['total']:>9.2f} {r['total'] / base['total']:>5.2f}x   {r['steady']:>15.2f} "
                  f"{r['steady'] / base['steady']:>5.2f}x   {first:>14.2f} {first / base['steady']:>5.2f}x   "
                  f"{startup(r):>10.1f}")
        for name, r in list(results.items())[1:]:
            gain = 1 / base["steady"] - 1 / r["steady"]  # seconds saved per image once running
            extra = startup(r) - startup(base)
            if gain > 0:
                print(f"{name}: ahead of (1) overall from about {extra / gain:.0f} images "
                      f"({extra:.1f} s more start-up, {gain * 1000:.0f} ms less per image)")
        print(f"2 fresh actors, before any model: up in {floor['empty']:.1f} s empty, {floor['imports']:.1f} s having "
              f"imported the scoring code (the loop's imports precede its clock)")
        two = list(results.values())[2]
        gain = 1 / base["steady"] - 1 / two["steady"]
        if gain > 0:
            print(f"at (3)'s {gain * 1000:.0f} ms less per image, those imports alone take "
                  f"{floor['imports'] / gain:.0f} images to pay back ({args.images} here)")
        sys.stdout.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
