"""Does the semantic decoupling learn to look somewhere? Its attention, epoch by epoch, on a synthetic job.

    python scripts/attention_entropy.py --config jobs/synthetic_hard.yaml --output-dir docs/results/attention \
        --variant "linear=" --variant "unit=model.decoupling_init=unit" [--images 128] [override ...]

Each ``--variant NAME=OVERRIDES`` (comma-separated ``key=value``, after the shared overrides) is one in-process
run (``experiment.fit``). Before training and after every epoch it measures, on the first ``--images`` test
images and the categories present in each:

- ``entropy``: the attention's entropy over the HW locations divided by log(HW) (1 = uniform, mean pooling);
- ``object_lift``: the attention mass on the cells whose centre lies inside the category's object (the synthetic
  scene says where each object is) divided by those cells' share of the map (1 = no preference, higher = the
  category's attention sits on its object).

Writes ``attention_entropy.json`` (every variant's curves and test mAP) and ``attention_entropy.png``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sarl.model.experiment import Splits, fit
from sarl.platform.job import load_job


def object_masks(dataset: Any, indices: range, categories: list[str], grid: int) -> np.ndarray:
    """(N, C, grid*grid) booleans: the cells whose centre lies inside an object of category c (any object)."""
    from sarl.model.data.synthetic import SHAPES

    size = dataset.image_size
    centres = (np.arange(grid) + 0.5) * size / grid
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    masks = np.zeros((len(indices), len(categories), grid * grid), dtype=bool)
    for n, i in enumerate(indices):
        for obj in dataset.scene(i).objects:
            c = categories.index(SHAPES[obj.shape])
            masks[n, c] |= (np.hypot(cx - obj.cx, cy - obj.cy) <= obj.radius).ravel()
    return masks


def attention_stats(model: Any, splits: Splits, images: int) -> dict[str, float]:
    """Mean normalised entropy and object lift of the attention over present categories (see the docstring)."""
    test = splits.test
    if not hasattr(test, "scene"):
        raise SystemExit("attention_entropy needs a synthetic data set (data.kind: synthetic) and no feature cache")
    idx = range(min(images, len(test)))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        batch = torch.stack([test[i][0] for i in idx])
        attn = model.attention_maps(batch).double().numpy()  # (N, C, HW)
    model.train(was_training)
    hw = attn.shape[-1]
    grid = math.isqrt(hw)
    if grid * grid != hw:
        raise SystemExit(f"the dense map has {hw} locations, not a square grid")
    masks = object_masks(test, idx, list(splits.categories), grid)
    present = masks.any(-1)  # categories with at least one cell inside an object
    entropy = -(attn * np.log(np.clip(attn, 1e-30, None))).sum(-1) / math.log(hw)
    mass = (attn * masks).sum(-1)
    share = masks.sum(-1) / hw
    lift = mass[present] / share[present]
    return {"entropy": float(entropy[present].mean()), "entropy_all": float(entropy.mean()),
            "object_lift": float(lift.mean()), "max_attention": float(attn.max(-1).mean())}


def plot(path: Path, runs: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, run in runs.items():
        epochs = [0] + [h["epoch"] for h in run["history"]]
        for ax, key in zip(axes, ("entropy", "object_lift")):
            ax.plot(epochs, [run["initial"][key]] + [h[key] for h in run["history"]], marker="o", ms=3,
                    label=name)
        axes[2].plot(epochs[1:], [h["test_mAP"] for h in run["history"]], marker="o", ms=3,
                     label=f"{name} ({run['test_mAP']:.1f})")
    axes[0].set_title("attention entropy / log(HW)  (1 = uniform)")
    axes[1].set_title("attention on the object / its area share  (1 = none)")
    axes[1].axhline(1.0, color="grey", lw=0.8, ls=":")
    axes[2].set_title("test mAP (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME=key=value,key=value")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    for spec in args.variant:
        name, _, extra = spec.partition("=")
        job = load_job(args.config, [*args.overrides, "train.test_every_epoch=true",
                                     *[o for o in extra.split(",") if o]])
        print(f"== {name}: {' '.join(extra.split(',')) or 'the job as written'}", flush=True)
        result = fit(job, out / "runs" / name, log=print,
                     on_epoch=lambda model, epoch, splits: attention_stats(model, splits, args.images))
        history = json.loads((out / "runs" / name / "history.json").read_text())
        runs[name] = {"overrides": extra, "initial": result["initial"], "test_mAP": result["test"]["mAP"],
                      "history": history}
        print(f"   {name}: entropy {result['initial']['entropy']:.5f} -> {history[-1]['entropy']:.5f}, object lift "
              f"{result['initial']['object_lift']:.3f} -> {history[-1]['object_lift']:.3f}, test mAP "
              f"{result['test']['mAP']:.2f}", flush=True)
    (out / "attention_entropy.json").write_text(json.dumps(runs, indent=2))
    plot(out / "attention_entropy.png", runs)
    print(f"wrote {out / 'attention_entropy.json'} and {out / 'attention_entropy.png'}")


if __name__ == "__main__":
    main()
