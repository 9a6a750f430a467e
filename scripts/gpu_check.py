"""The GPU checks behind scripts/gpu_check.sh: logits CPU vs GPU, serving and cached features on the GPU, a Serve
replica on a GPU (scores over HTTP against the CPU), a
2-worker run killed once and resumed on the GPU, evaluation on GPU workers, and Ray Train smoke tests with
images/s.

``--dry-run`` runs the Ray checks (resume, evaluation, smoke) on CPU workers at small sizes, so the script itself
is checked on a machine without a GPU before GPU time is spent on it; the logits and serving checks then compare
the CPU with itself.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

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
    gpu = bind_vocabulary(model, served).score(model, images.to(device), autocast=False).cpu()  # fp32 vs fp32
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


def served_replica(gpu: bool = True) -> bool:
    """The GPU replica path: a Serve app with ``sarl serve --gpus 1``'s settings on a local cluster, its scores over
    HTTP (bf16 autocast on CUDA, fp32 cosines) against the same checkpoint on the CPU; then ``/readyz``. Also
    rn50 (224 px) through ``load_checkpoint(map_location=cuda)`` and ``score_list``, as a replica scores.
    """
    import io

    import numpy as np
    import ray
    import requests
    from PIL import Image
    from ray import serve

    from sarl.model import Category, Vocabulary
    from sarl.model.checkpoint import load_checkpoint, save_checkpoint
    from sarl.model.data.transforms import build_transforms
    from sarl.model.serving import bind_vocabulary
    from sarl.platform.serve import ServeConfig, deploy, with_gpus
    from sarl.platform.serve.io import decode_image

    device = "cuda" if gpu else "cpu"
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        vocabulary = Vocabulary([Category(n) for n in CATEGORIES], version="gpu-check")
        for name, pretrained in (("tiny", None), ("rn50", None)):
            model = create_model(name, vocabulary, pretrained=pretrained, semantic_source="clip").eval()
            directory = save_checkpoint(model, Path(tmp) / name)
            size = model.config.image_size
            transform = build_transforms(size, model.config.mean, model.config.std, train=False)
            rng = np.random.default_rng(0)
            photos = []
            for _ in range(8):
                out = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size + 17, size + 31, 3), dtype=np.uint8)).save(out, "PNG")
                photos.append(out.getvalue())
            tensors = [transform(decode_image(p, 10**8)) for p in photos]
            cpu = torch.tensor(bind_vocabulary(model, vocabulary).score_list(model, tensors, torch.device("cpu")))
            loaded = load_checkpoint(directory, map_location=device).eval()
            on_device = torch.tensor(bind_vocabulary(loaded, vocabulary).score_list(loaded, tensors,
                                                                                     torch.device(device)))
            err = (cpu - on_device).abs().max().item()
            placed = {p.device.type for p in loaded.parameters()} == {device}
            good = placed and err < 2e-2
            print(f"{name:<5} replica scoring (load_checkpoint map_location={device}, bf16 autocast): parameters on "
                  f"{device} {placed}, |cpu - {device}| {err:.2e}  {'OK' if good else 'FAIL'}")
            ok &= good
            if name != "tiny":
                continue
            ray.init(num_cpus=4, num_gpus=1 if gpu else 0, include_dashboard=False)
            try:
                config = with_gpus(ServeConfig({"host": "127.0.0.1", "port": 8123}, {}, {
                    "num_replicas": 1, "autoscaling_config": None}), 1 if gpu else 0)
                url = deploy({"checkpoint": str(directory), **config.args}, config)
                started = time.perf_counter()
                served = torch.tensor([[requests.post(f"{url}/v1/predict", data=p, params={"threshold": 0.0},
                                                      headers={"Content-Type": "image/png"}, timeout=60)
                                        .json()["scores"][c] for c in CATEGORIES] for p in photos])
                elapsed = time.perf_counter() - started
                ready = requests.get(f"{url}/readyz", timeout=30).json()
                err = (served - cpu).abs().max().item()
                good = err < 2e-2 and ready.get("status") == "ready"
                print(f"tiny  served over HTTP by a replica with {1 if gpu else 0} GPU: |served - cpu| {err:.2e}, "
                      f"{len(photos) / elapsed:.1f} requests/s sequential, readyz {ready.get('status')}  "
                      f"{'OK' if good else 'FAIL'}")
                ok &= good
            finally:
                serve.shutdown()
                ray.shutdown()
    return ok


def resume_and_evaluate(gpu: bool = True) -> bool:
    """A 2-worker run that fails once in epoch 2 and resumes from its epoch-1 checkpoint, then evaluation of its
    best checkpoint on GPU workers.

    On a GPU the resume is where the optimizer state must follow the parameters onto the device (loaded before
    ``prepare_model`` moved them, the first step after the restart mixed devices). Each epoch must be in the raw
    history once, and the checkpoint must hold both ranks' RNG states, CUDA's included. Two GPUs or more: one per
    worker over NCCL; one GPU: the two workers share it over gloo (NCCL refuses two ranks on one device).
    """
    from ray.train.torch import TorchConfig, TorchTrainer

    from sarl.model.checkpoint import load_train_state
    from sarl.model.config import to_dict
    from sarl.platform import storage
    from sarl.platform.cluster import init_ray
    from sarl.platform.evaluate import evaluate_checkpoint
    from sarl.platform.runs import Run
    from sarl.platform.train import run_config, scaling_config, train_loop_per_worker

    gpus = torch.cuda.device_count() if gpu else 0
    share = gpu and gpus < 2
    job = load_job("jobs/demo.yaml", [
        "data.options.num_images=320", "train.epochs=3", "train.batch_size=16", "scaling.num_workers=2",
        f"scaling.use_gpu={str(gpu).lower()}", *([f"scaling.gpus_per_worker={0.5 if share else 1}"] if gpu else []),
        "run.fail_once_at_epoch=2", "run.max_failures=1", "run.keep_checkpoints=3",
        f"run.storage_path={tempfile.mkdtemp()}", "run.name=gpu-resume"])
    start = time.perf_counter()
    init_ray(job.address)
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"job": to_dict(job)},
                           scaling_config=scaling_config(job), run_config=run_config(job),
                           torch_config=TorchConfig(backend="gloo" if share or not gpu else "nccl"))
    result = trainer.fit()
    if result.error:
        print(f"resume on {'GPU' if gpu else 'CPU'}: FAIL, {result.error!r}")
        return False
    run = Run.of(job)
    epochs = [json.loads(line)["epoch"] for line in storage.read_text(run.history_uri).splitlines()]
    failed = storage.exists(run.join(".failed_once_at_epoch_2"))
    with result.checkpoint.as_directory() as ckpt:
        ranks = load_train_state(Path(ckpt))["rng_per_rank"]
    cuda_rng = all("cuda" in r for r in ranks) if gpu else True
    distinct = not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    ok = failed and epochs == [1, 2, 3] and len(ranks) == 2 and cuda_rng and distinct
    print(f"2 workers {'sharing one GPU (gloo)' if share else 'on GPUs (NCCL)' if gpu else 'on CPUs (gloo)'}: "
          f"failed once in epoch 2 {failed}, raw history epochs {epochs}, RNG states of {len(ranks)} ranks "
          f"(CUDA {cuda_rng}, distinct {distinct}), {time.perf_counter() - start:.0f} s  {'OK' if ok else 'FAIL'}")
    best = max(result.best_checkpoints, key=lambda cm: cm[1]["val_mAP"])
    workers = 2 if not gpu or gpus >= 2 else 1  # 2 eval workers on one GPU would each wait for a whole GPU
    evaluated = evaluate_checkpoint(best[0].path, "val", workers=workers)
    eval_err = abs(evaluated["mAP"] - best[1]["val_mAP"])
    eval_ok = eval_err < (1.0 if gpu else 1e-3)  # bf16 on the GPU against what the evaluation ran in
    print(f"evaluation with {workers} worker(s) of the best checkpoint: mAP {evaluated['mAP']:.2f}, training said "
          f"{best[1]['val_mAP']:.2f} (|diff| {eval_err:.2e})  {'OK' if eval_ok else 'FAIL'}")
    return ok and eval_ok


def train_smoke(model: str, size: int, images: int, gpu: bool = True) -> bool:
    job = load_job("jobs/demo.yaml", [
        f"model.name={model}", "model.pretrained=null", "model.semantic_source=clip",
        f"data.options.num_images={images}", f"data.options.image_size={size}",
        f"data.num_workers={4 if gpu else 0}", "train.epochs=2", "train.batch_size=32", "scaling.num_workers=1",
        f"scaling.use_gpu={str(gpu).lower()}",
        "scaling.cpus_per_worker=4" if gpu else "scaling.cpus_per_worker=1",
        f"run.storage_path={tempfile.mkdtemp()}", f"run.name=gpu-{model}"])
    start = time.perf_counter()
    result = run_training(job)
    rate = max(row["samples_per_s"] for row in result["history"])
    where = "GPU (NCCL, bf16)" if gpu else "CPU"
    print(f"{model:<5} Ray Train on {where}: {rate:.0f} images/s, val mAP {result['metrics']['val_mAP']:.1f},"
          f" {time.perf_counter() - start:.0f} s")
    return rate > 0


def main(argv: list[str]) -> int:
    dry = "--dry-run" in argv
    if dry:  # the Ray checks on CPU workers, small: the script's own check on a machine without a GPU
        ok = serving_and_cache_match("cpu")
        ok &= served_replica(gpu=False)
        ok &= resume_and_evaluate(gpu=False)
        ok &= train_smoke("tiny", 64, 128, gpu=False)
        print("GPU checks, dry run on the CPU:", "passed" if ok else "FAILED")
        return 0 if ok else 1
    if not torch.cuda.is_available():
        print("no CUDA device (--dry-run runs the checks on the CPU)", file=sys.stderr)
        return 1
    ok = logits_cpu_vs_gpu("tiny", 64)
    ok &= logits_cpu_vs_gpu("rn50", 224, pretrained=None, semantic_source="clip")
    ok &= serving_and_cache_match()
    ok &= served_replica()
    ok &= resume_and_evaluate()
    ok &= train_smoke("tiny", 64, 1200)
    ok &= train_smoke("rn50", 224, 512)
    print("GPU checks:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
