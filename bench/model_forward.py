"""Inference throughput of the model library on this machine's CPU, printed side by side.

1. images/s of ``tiny`` and ``rn50`` (random weights, 224 px for rn50) at batch 1, 8 and 32;
2. cached vs recomputed text features at inference (the prompt features do not depend on the image, so
   serving computes them once per vocabulary version).

    python bench/model_forward.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from sarl.model import create_model

CATEGORIES = [f"category {i}" for i in range(20)]  # VOC-sized vocabulary


def images_per_second(model: torch.nn.Module, batch: int, size: int, seconds: float) -> float:
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(x)  # warm-up (and fills the text-feature cache when enabled)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or n == 0:
            model(x)
            n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter timing windows")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seconds = 1.0 if args.quick else 3.0
    print(f"torch {torch.__version__}, CPU threads {args.threads}, {len(CATEGORIES)} categories\n")
    models = {
        "tiny": (create_model("tiny", CATEGORIES).eval(), 64),
        "rn50": (create_model("rn50", CATEGORIES, pretrained=None, semantic_source="clip").eval(), 224),
    }
    print("images/s (text features cached)")
    print(f"{'model':<6} {'px':>4} " + " ".join(f"{'batch ' + str(b):>10}" for b in (1, 8, 32)))
    for name, (model, size) in models.items():
        rates = [images_per_second(model, b, size, seconds) for b in (1, 8, 32)]
        print(f"{name:<6} {size:>4} " + " ".join(f"{r:>10.1f}" for r in rates))

    print("\ncached vs recomputed text features, batch 1 and 8 (images/s)")
    print(f"{'model':<6} {'batch':>5} {'cached':>10} {'recomputed':>11} {'ratio':>7}")
    for name, (model, size) in models.items():
        for batch in (1, 8):
            model.cache_text = True
            cached = images_per_second(model, batch, size, seconds)
            model.cache_text = False
            recomputed = images_per_second(model, batch, size, seconds)
            model.cache_text = True
            print(f"{name:<6} {batch:>5} {cached:>10.1f} {recomputed:>11.1f} {cached / recomputed:>6.2f}x")


if __name__ == "__main__":
    main()
