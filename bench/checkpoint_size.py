"""Checkpoint size before and after format 2, for frozen rn50 and rn101 with 80 categories, printed side by side.

For each architecture: random CLIP weights saved to a temporary local weights file (the "source", standing in for
the OpenAI file), a frozen model (``unfreeze: none``, CLIP-text semantics) built from it, then
- old:      the format 1 weights file, the whole state dict as ``save_checkpoint`` wrote it from a GPU (every entry
            its own CPU copy, so the text tower twice); "old, CPU" is the same dict saved from CPU tensors, where
            ``torch.save`` stores shared tensors once;
- new:      ``save_checkpoint`` (trainable tensors + the backbone's identity and digest), the whole directory;
- export:   ``export_checkpoint`` (self-contained), the whole directory;
and checks that both reload to bit-identical logits on one batch of two images (224 px for both, to keep it short
on a CPU; the size does not depend on it). Building rn101 on CPU takes a while.

    python bench/checkpoint_size.py [--models rn50 rn101] [--threads N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sarl.model import create_model, get_model_config
from sarl.model.backbone import build_clip
from sarl.model.checkpoint import export_checkpoint, load_checkpoint, save_checkpoint

CATEGORIES = [f"category {i}" for i in range(80)]  # COCO-sized vocabulary
MiB = 2**20


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(name: str, tmp: Path, image_size: int) -> dict:
    cfg = get_model_config(name)
    torch.manual_seed(0)
    source = tmp / f"{name}-random.pt"
    torch.save(build_clip(cfg.clip).state_dict(), source)
    model = create_model(name, CATEGORIES, pretrained=str(source), unfreeze="none", semantic_source="clip",
                         image_size=image_size).eval()
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
    state = model.state_dict()
    params = sum(t.numel() for t in {id(t): t for t in model.state_dict(keep_vars=True).values()}.values())
    torch.save({k: v.detach().clone() for k, v in state.items()}, tmp / "old-gpu.pt")  # what CUDA saves wrote
    torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp / "old-cpu.pt")
    start = time.perf_counter()
    save_checkpoint(model, tmp / "new")
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    export_checkpoint(tmp / "new", tmp / "export")
    export_s = time.perf_counter() - start
    del model
    start = time.perf_counter()
    loaded = load_checkpoint(tmp / "new").eval()
    load_s = time.perf_counter() - start
    with torch.no_grad():
        new_equal = torch.equal(loaded(images), expected)
    del loaded
    start = time.perf_counter()
    exported = load_checkpoint(tmp / "export").eval()
    load_export_s = time.perf_counter() - start
    with torch.no_grad():
        export_equal = torch.equal(exported(images), expected)
    return {"model": name, "params": params,
            "old": size(tmp / "old-gpu.pt"), "old_cpu": size(tmp / "old-cpu.pt"), "new": size(tmp / "new"),
            "export": size(tmp / "export"), "save_s": save_s, "export_s": export_s, "load_s": load_s,
            "load_export_s": load_export_s, "identical": new_equal and export_equal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["rn50", "rn101"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU threads, {len(CATEGORIES)} categories, frozen towers "
          f"(unfreeze: none), random weights from a local file, logits at {args.image_size} px\n")
    rows = []
    for name in args.models:
        tmp = Path(tempfile.mkdtemp(prefix=f"ckpt-size-{name}-"))
        try:
            rows.append(measure(name, tmp, args.image_size))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    header = (f"{'model':<6} {'params':>7} {'old MiB':>8} {'old,CPU':>8} {'new MiB':>8} {'export':>8} "
              f"{'new/old':>8} {'exp/old':>8} {'save s':>7} {'load s':>7} {'export s':>8} {'load exp s':>10} "
              f"identical logits")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<6} {r['params'] / 1e6:>6.1f}M {r['old'] / MiB:>8.1f} {r['old_cpu'] / MiB:>8.1f} "
              f"{r['new'] / MiB:>8.2f} {r['export'] / MiB:>8.1f} {r['new'] / r['old']:>8.4f} "
              f"{r['export'] / r['old']:>8.3f} {r['save_s']:>7.2f} {r['load_s']:>7.2f} {r['export_s']:>8.2f} "
              f"{r['load_export_s']:>10.2f} {'yes' if r['identical'] else 'NO'}")
    print("\nold: format 1 weights.pt saved from a GPU (text tower twice); old,CPU: the same from CPU tensors; new: "
          "format 2 directory (trainable tensors + backbone identity); export: self-contained directory. save s "
          "includes the one-off backbone digest; load s rebuilds the towers from the source file and checks it.")
    if not all(r["identical"] for r in rows):
        raise SystemExit("reloaded logits differ")


if __name__ == "__main__":
    main()
