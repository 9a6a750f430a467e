"""The GPU checks behind scripts/gpu_check.sh: logits CPU vs GPU, serving and cached features on the GPU,
and Ray Train smoke tests with images/s."""

from __future__ import annotations

import sys
import tempfile
import time

import torch

from sarl.model import create_model
from sarl.platform.job import load_job
from sarl.platform.train import run_training

CATEGORIES = [f"category {i}" for i in range(20)]


def logits_cpu_vs_gpu(name: str, size: int, **overrides) -> bool:
    torch.manual_seed(0)
    model = create_model(name, CATEGORIES, **overrides).eval()
    images = torch.randn(4, 3, size, size)
    with torch.no_grad():
        cpu = model(images)
        gpu_model = model.cuda()
        gpu_model._text_cache = None
        gpu = gpu_model(images.cuda()).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gpu_model._text_cache = None
            bf16 = gpu_model(images.cuda()).float().cpu()
    fp32_err, bf16_err = (cpu - gpu).abs().max().item(), (cpu - bf16).abs().max().item()
    ok = fp32_err < 1e-3 and bf16_err < 0.5
    print(f"{name:<5} logits |cpu - gpu| fp32 {fp32_err:.2e}, bf16 autocast {bf16_err:.2e}  {'OK' if ok else 'FAIL'}")
    return ok


def serving_and_cache_match(device: str = "cuda") -> bool:
    """A served vocabulary with a zero-shot category, and features cached on the GPU, against the CPU.

    ``device="cpu"`` runs the same steps on the CPU (a dry run of this check on a machine without a GPU).
    """
    import numpy as np

    from sarl.model import Category, Vocabulary
    from sarl.model.features import compute_features
    from sarl.model.serving import bind_vocabulary

    torch.manual_seed(0)
    model = create_model("rn50", CATEGORIES, pretrained=None, semantic_source="clip").eval()
    served = Vocabulary([*model.vocabulary.categories, Category("zero-shot thing")], version="gpu")
    images = torch.randn(4, 3, 224, 224)
    cpu = bind_vocabulary(model, served).score(model, images)
    model = model.to(device)
    model._text_cache = None
    gpu = bind_vocabulary(model, served).score(model, images.to(device)).cpu()
    serve_err = (cpu - gpu).abs().max().item()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = [(img, torch.zeros(len(CATEGORIES))) for img in images]
        compute_features(model, dataset, tmp, device=device, dtype="float32")
        dense = torch.from_numpy(np.load(f"{tmp}/dense.npy")[0]).to(device)  # view 0
        glob = torch.from_numpy(np.load(f"{tmp}/global.npy")[0]).to(device)
        with torch.no_grad():
            cache_err = (model((dense, glob)) - model(images.to(device))).abs().max().item()
    ok = serve_err < 1e-3 and cache_err < 1e-3
    print(f"rn50  served probabilities |cpu - {device}| {serve_err:.2e}; logits cached vs full on {device} "
          f"{cache_err:.2e}  "
          f"{'OK' if ok else 'FAIL'}")
    return ok


def train_smoke(model: str, size: int, images: int) -> bool:
    job = load_job("jobs/demo.yaml", [
        f"model.name={model}", "model.pretrained=null", "model.semantic_source=clip",
        f"data.options.num_images={images}", f"data.options.image_size={size}", "data.num_workers=4",
        "train.epochs=2", "train.batch_size=32", "scaling.num_workers=1", "scaling.use_gpu=true",
        "scaling.cpus_per_worker=4", f"run.storage_path={tempfile.mkdtemp()}", f"run.name=gpu-{model}"])
    start = time.perf_counter()
    result = run_training(job)
    rate = max(row["samples_per_s"] for row in result["history"])
    print(f"{model:<5} Ray Train on GPU (NCCL, bf16): {rate:.0f} images/s, val mAP {result['metrics']['val_mAP']:.1f},"
          f" {time.perf_counter() - start:.0f} s")
    return rate > 0


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    ok = logits_cpu_vs_gpu("tiny", 64)
    ok &= logits_cpu_vs_gpu("rn50", 224, pretrained=None, semantic_source="clip")
    ok &= serving_and_cache_match()
    ok &= train_smoke("tiny", 64, 1200)
    ok &= train_smoke("rn50", 224, 512)
    print("GPU checks:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
