"""Draw the semantic decoupling's attention maps of a SARL checkpoint on test images of its job.

    python scripts/attention_maps.py --checkpoint runs/.../best --output attention.png [--images 6] [--job job.yaml]

The job (the checkpoint's ``job.yaml``, or ``--job`` for an in-process run's ``config.yaml``) says which data set
and transform to use. Each row: an image, then every category's attention over it (present categories bold).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from sarl.model.checkpoint import load_checkpoint
from sarl.model.config import load_config
from sarl.model.experiment import ExperimentConfig, prepare_data
from sarl.plots import attention_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--job", help="job/config YAML (default: job.yaml or ../config.yaml beside the checkpoint)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--images", type=int, default=6)
    args = parser.parse_args()
    ckpt = Path(args.checkpoint)
    job = args.job or next((str(p) for p in (ckpt / "job.yaml", ckpt.parent / "config.yaml") if p.is_file()), None)
    if job is None:
        parser.error("no job.yaml beside the checkpoint: pass --job")
    import yaml

    data = yaml.safe_load(Path(job).read_text())
    cfg = load_config(ExperimentConfig, None, base={k: data[k] for k in ("name", "model", "data", "loss", "optim",
                                                                          "train") if k in data})
    test = prepare_data(cfg).test
    model = load_checkpoint(ckpt).eval()
    idx = list(range(min(args.images, len(test))))
    images = torch.stack([test[i][0] for i in idx])
    maps = model.attention_maps(images)  # (N, C, HW)
    side = int(math.isqrt(maps.shape[-1]))
    maps = maps.reshape(len(idx), maps.shape[1], side, side).numpy()
    mean, std = np.array(model.config.mean)[:, None, None], np.array(model.config.std)[:, None, None]
    pixels = np.clip(images.numpy() * std + mean, 0, 1).transpose(0, 2, 3, 1)
    out = attention_grid(args.output, pixels, maps, test.labels[idx], model.vocabulary.names,
                         title=f"Attention per category: {ckpt}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
