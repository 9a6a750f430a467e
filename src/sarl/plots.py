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


def map_vs_proportion(path: str | Path, proportions: Sequence[float],
                      map_by_method: Mapping[str, Sequence[float | tuple[float, float]]],
                      title: str = "mAP against known-label proportion") -> Path:
    """One line per method: test mAP (%) at each known-label proportion.

    Values are means, or ``(mean, standard deviation)`` pairs drawn with error bars. A label containing
    "test-selected" is dashed: that number was chosen on the test set (the peers' convention).
    """
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [100 * p for p in proportions]
    colours: dict[str, str] = {}
    for label, values in map_by_method.items():
        pairs = [v if isinstance(v, (tuple, list)) else (v, 0.0) for v in values]
        mean, sd = [m for m, _ in pairs], [d for _, d in pairs]
        method = label.split(" (")[0]
        line = ax.errorbar(x, mean, yerr=sd if any(sd) else None, marker="o", capsize=3, label=label,
                           linestyle="--" if "test-selected" in label else "-", color=colours.get(method))
        colours.setdefault(method, line.lines[0].get_color())
    ax.set_xlabel("known labels (%)")
    ax.set_ylabel("mAP (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def learning_curves(path: str | Path, records: Sequence[Mapping], proportions: Sequence[float],
                    methods: Sequence[str], metric: str = "curve_val_mAP") -> Path:
    """Validation mAP per epoch, one panel per proportion, one line per method (mean over seeds, band = range).

    ``records`` are protocol runs with ``method``, ``proportion`` and the per-epoch ``metric`` list. A curve
    still rising at its last epoch means the budget stopped that method before its plateau.
    """
    path = Path(path)
    n = len(proportions)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.4), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], proportions):
        for method in methods:
            curves = [r[metric] for r in records if r["method"] == method and r["proportion"] == p and r[metric]]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            arr = np.asarray([c[:length] for c in curves], dtype=float)
            epochs = np.arange(1, length + 1)
            (line,) = ax.plot(epochs, arr.mean(0), label=method)
            if len(arr) > 1:
                ax.fill_between(epochs, arr.min(0), arr.max(0), alpha=0.2, color=line.get_color())
        ax.set_title(f"{p:.0%} known labels")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation mAP (%)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
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



def attention_grid(path: str | Path, images: np.ndarray, maps: np.ndarray, labels: np.ndarray,
                   categories: Sequence[str], title: str = "Semantic decoupling: attention per category") -> Path:
    """One row per image: the image, then each category's spatial attention over it.

    ``images`` (N, H, W, 3) in [0, 1], ``maps`` (N, C, h, w) attention weights, ``labels`` (N, C) in {1, 0, -1}.
    A category present in the image has its name in bold: its map should cover its object, the others anything.
    The colour scale runs from 0 to the row's largest weight, so a near-uniform map (1 / locations) stays dark.
    """
    path = Path(path)
    n, c = maps.shape[:2]
    fig, axes = plt.subplots(n, c + 1, figsize=(1.3 * (c + 1), 1.4 * n + 0.5), squeeze=False)
    for i in range(n):
        axes[i][0].imshow(images[i])
        for j in range(c):
            ax = axes[i][j + 1]
            ax.imshow(images[i], alpha=0.35)
            ax.imshow(maps[i, j], cmap="magma", alpha=0.75, interpolation="nearest", vmin=0.0, vmax=maps[i].max(),
                      extent=(0, images.shape[2], images.shape[1], 0))  # one scale per row: flat maps look flat
            present = labels[i, j] == 1
            ax.set_title(categories[j], fontsize=7, fontweight="bold" if present else "normal",
                         color="black" if present else "grey")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
