"""``sarl demo``: SARL against the CLIP ``global`` baseline on generated data, through Ray Train, then served.

Starts a local Ray cluster, trains the tiny SARL model and the ``global`` baseline with 2 CPU workers each at
30% known labels (the same saved mask for both), evaluates each best-on-validation checkpoint on the complete
test labels, prints the table and writes a PNG of per-class AP. Then it serves the SARL checkpoint on Ray Serve
and changes its vocabulary while serving (:mod:`sarl.demo_serve`). Everything runs on embedded defaults (the
same as ``jobs/demo.yaml``); ``key=value`` overrides change any field, e.g. ``train.epochs=2``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .plots import per_class_ap

# Sized so both models train in a few minutes on 2 CPU cores and SARL clearly beats chance.
DEMO_JOB = {
    "name": "demo",
    "model": {"name": "tiny", "head": "sarl", "semantic_source": "word", "word_vectors": "glove-6b-50d"},
    "data": {"kind": "synthetic", "known_proportion": 0.3, "augment": "none", "num_workers": 0,
             "options": {"num_images": 1200, "image_size": 64, "seed": 0}},
    "loss": {"name": "asl"},
    "optim": {"name": "adamw", "lr": 0.003, "lr_batch_size": 64, "weight_decay": 0.0001, "warmup_epochs": 0.5},
    "train": {"epochs": 30, "batch_size": 32, "eval_batch_size": 128, "progress": False},
    "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    "run": {"storage_path": "runs/ray", "max_failures": 1, "keep_checkpoints": 2},
}
METHODS = ["sarl", "global"]


def run_demo(output_dir: str | Path = "runs/demo", overrides: list[str] = (),
             serve: bool = True) -> dict[str, dict[float, float]]:
    from .platform.protocol import run_protocol

    output_dir = Path(output_dir)
    start = time.perf_counter()
    proportion = DEMO_JOB["data"]["known_proportion"]
    # A fresh run name each time: rerunning a name resumes it (and a finished run has nothing left to do).
    stamp = time.strftime("%Y%m%d-%H%M%S")
    table = run_protocol(None, METHODS, [proportion], output_dir, [f"run.name=demo-{stamp}", *overrides],
                         base=DEMO_JOB)
    print("\nmethods x known-label proportion:\n" + (output_dir / "table.md").read_text())
    runs = json.loads((output_dir / "runs.json").read_text())
    png = per_class_ap(output_dir / "per_class_ap.png", runs[0]["categories"],
                       {r["method"]: r["test_AP"] for r in runs}, title="Synthetic shapes, 30% known labels")
    chance = runs[0]["test_chance_mAP"]
    print(f"\nchance level (mAP of random scores on the test set): {chance:.2f}")
    print(f"per-class AP plot: {png}\ntables: {output_dir}/table.md, table.csv")
    collection = write_collection(output_dir / "collection")
    print(f"a partially labelled collection to label (jobs/predict.yaml, jobs/complete.yaml): {collection}")
    if serve:
        from .demo_serve import serve_demo

        sarl = next(r for r in runs if r["method"] == "sarl")
        serve_demo(sarl["checkpoint"], output_dir, DEMO_JOB["data"]["options"]["image_size"])
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return table


def write_collection(folder: Path, num_images: int = 200, known: float = 0.3) -> Path:
    """Generated images like the demo's (another stream) with a manifest where 70% of the entries are unknown."""
    import numpy as np

    from .model.data.synthetic import SyntheticShapes

    data = SyntheticShapes(num_images, image_size=DEMO_JOB["data"]["options"]["image_size"], seed=7,
                           split="collection")
    data.labels[np.random.default_rng(7).random(data.labels.shape) > known] = -1
    return data.write_to(folder)


__all__ = ["DEMO_JOB", "run_demo", "write_collection"]
