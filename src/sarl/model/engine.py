"""Training and evaluation loops: plain PyTorch, no framework.

The Ray Train layer calls exactly these functions on every worker; it only prepares the model and loaders
(DDP, distributed samplers) and reports what they return. Metrics are torchmetrics objects, so under a process
group ``compute()`` covers the whole validation set rather than averaging per-shard numbers.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .metrics import MultiLabelMetrics


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); a no-op elsewhere or when disabled."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


Inputs = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


def _unpack(batch: Any) -> tuple[Inputs, torch.Tensor, int]:
    """(inputs, targets[, num_skipped]) from a loader batch (see ``data.collate_skip_bad``).

    Inputs are images, or a ``(dense, global)`` pair of cached features (``sarl.model.features``).
    """
    images, targets = batch[0], batch[1]
    skipped = int(batch[2]) if len(batch) > 2 else 0
    return images, targets, skipped


def _to_device(inputs: Inputs, device: torch.device) -> Inputs:
    if isinstance(inputs, (tuple, list)):
        return tuple(t.to(device, non_blocking=True) for t in inputs)
    return inputs.to(device, non_blocking=True)


def _batch_size(inputs: Inputs) -> int:
    return int((inputs[0] if isinstance(inputs, (tuple, list)) else inputs).shape[0])


def train_one_epoch(model: nn.Module, loader: Iterable, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device | str = "cpu", epoch: int = 1, scheduler: Any = None, amp: bool = True,
                    grad_clip: float | None = None, max_steps: int | None = None, progress: bool = True,
                    desc: str | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, samples, samples/s, skipped images and the learning rate.

    ``scheduler`` (if given) steps once per batch. ``max_steps`` bounds the pass (benchmarks, smoke tests).
    """
    device = torch.device(device)
    model.train()
    if hasattr(loss_fn, "set_epoch"):  # schedules of ll_r / ll_ct and label completion
        loss_fn.set_epoch(epoch)
    if hasattr(getattr(loader, "dataset", None), "set_epoch"):  # cached features: fixed augmented view per epoch
        loader.dataset.set_epoch(epoch)
    total_loss, samples, skipped, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc or f"epoch {epoch}", disable=not progress, leave=False, dynamic_ncols=True)
    for batch in bar:
        images, targets, n_bad = _unpack(batch)
        skipped += n_bad
        n = _batch_size(images)
        if n == 0:
            continue
        images = _to_device(images, device)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        loss = loss_fn(logits.float(), targets)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {steps}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * n
        samples += n
        steps += 1
        bar.set_postfix(loss=f"{total_loss / samples:.4f}")
        if max_steps is not None and steps >= max_steps:
            break
    elapsed = time.perf_counter() - start
    if skipped:
        warnings.warn(f"epoch {epoch}: skipped {skipped} unreadable image(s)", stacklevel=2)
    return {
        "loss": total_loss / max(samples, 1),
        "samples": samples,
        "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
        "skipped_images": skipped,
        "lr": optimizer.param_groups[0]["lr"],
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
             metrics: MultiLabelMetrics | None = None, num_classes: int | None = None, amp: bool = True,
             progress: bool = True, desc: str = "eval", return_outputs: bool = False) -> dict[str, Any]:
    """Scores every batch and returns the metrics (mAP, CF1, OF1 ... in percent, per-class ``AP``).

    Pass a ``metrics`` object created for the process group to get metrics over all workers' shards.
    With ``return_outputs`` the local logits and targets are returned too (``logits``, ``targets``).
    """
    device = torch.device(device)
    model.eval()
    if metrics is None:
        if num_classes is None:
            num_classes = getattr(model, "num_classes", None) or getattr(model, "module", None).num_classes
        metrics = MultiLabelMetrics(num_classes)
    metrics = metrics.to(device)
    metrics.reset()
    outputs, labels, skipped = [], [], 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        images, targets, n_bad = _unpack(batch)
        skipped += n_bad
        if _batch_size(images) == 0:
            continue
        images, targets = _to_device(images, device), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        metrics.update(logits.float(), targets)
        if return_outputs:
            outputs.append(logits.float().cpu())
            labels.append(targets.cpu())
    result = {k: (v.tolist() if torch.is_tensor(v) and v.numel() > 1 else float(v)) for k, v in
              metrics.compute().items()}
    if skipped:
        warnings.warn(f"{desc}: skipped {skipped} unreadable image(s)", stacklevel=2)
    result["skipped_images"] = skipped
    if return_outputs:
        result["logits"] = torch.cat(outputs) if outputs else torch.empty(0)
        result["targets"] = torch.cat(labels) if labels else torch.empty(0)
    return result


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: matrices and prompt contexts do; biases, gains and the logit scale do not.

    As in CLIP training (open_clip's ``exclude``): decay would pull the log scale towards 0 (s -> 1) and the
    per-category biases towards 0, i.e. towards priors the data did not choose.
    """
    return param.ndim >= 2 and not any(part in name for part in ("bias", "log_scale", "logit_scale", ".bn", ".ln"))


def build_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.002, weight_decay: float = 5e-4,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD (the peers' recipe) or AdamW over the trainable parameters only; see :func:`decays` for the decay."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd or adamw")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0) -> Any:
    """Per-step schedule: ``cosine`` (with linear warm-up) or ``constant``."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name != "cosine":
        raise ValueError(f"unknown scheduler {name!r}; choose cosine or constant")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
