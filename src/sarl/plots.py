"""Figures people would rather look at than read: per-class AP, mAP against proportion, sweep curves.

Matplotlib with the Agg backend (no display needed); every function writes a PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def per_class_ap(path: str | Path, categories: Sequence[str], ap_by_method: Mapping[str, Sequence[float]],
                 title: str = "Per-class AP") -> Path:
    """Grouped horizontal bars: one group per category, one bar per method, mAP in the legend."""
    path = Path(path)
    methods = list(ap_by_method)
    n = len(categories)
    height = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * n * max(1, len(methods)) ** 0.5))
    y = np.arange(n)
    for i, method in enumerate(methods):
        ap = np.asarray(ap_by_method[method], dtype=float)
        label = f"{method} (mAP {np.nanmean(ap):.1f})"
        ax.barh(y + (i - (len(methods) - 1) / 2) * height, np.nan_to_num(ap), height=height, label=label)
    ax.set_yticks(y, list(categories))
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("average precision (%)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def map_vs_proportion(path: str | Path, proportions: Sequence[float], map_by_method: Mapping[str, Sequence[float]],
                      title: str = "mAP against known-label proportion") -> Path:
    """One line per method: test mAP (%) at each known-label proportion."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, values in map_by_method.items():
        ax.plot([100 * p for p in proportions], values, marker="o", label=method)
    ax.set_xlabel("known labels (%)")
    ax.set_ylabel("mAP (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def trial_curves(path: str | Path, trials: Sequence[Mapping], metric: str = "val_mAP", max_epochs: int | None = None,
                 title: str = "Validation mAP per trial") -> Path:
    """One line per sweep trial over epochs; trials stopped early end in an ``x``, the best one is thick.

    ``trials`` are records with ``curve`` (the metric per epoch), ``status`` and ``trial_id``, best first.
    """
    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5))
    for rank, trial in enumerate(trials):
        curve = list(trial["curve"])
        if not curve:
            continue
        epochs = np.arange(1, len(curve) + 1)
        stopped = trial["status"] != "completed"
        label = f"{trial['trial_id']} ({trial['status']}, best {max(curve):.1f})"
        (line,) = ax.plot(epochs, curve, linewidth=2.5 if rank == 0 else 1.2, linestyle="--" if stopped else "-",
                          label=label)
        if stopped:
            ax.plot(epochs[-1], curve[-1], marker="x", markersize=9, color=line.get_color())
    if max_epochs:
        ax.set_xlim(0.8, max_epochs + 0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title + "  (dashed + x: stopped early by the scheduler)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

