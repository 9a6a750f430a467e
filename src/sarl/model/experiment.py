"""Experiment configuration and the in-process pipeline: data, mask, model, loss, optimiser, fit.

``ExperimentConfig`` is what a job YAML holds (``jobs/*.yaml``); the platform extends it with Ray sections.
``fit`` runs a whole experiment in this process (demo, tests, the benchmark's baseline); the Ray Train
worker reuses ``prepare_data``, ``build_components`` and the ``engine`` loops, so both paths train identically.
With ``cache.enabled`` (a frozen visual tower) both also call ``prepare_cached``, which swaps the image datasets
for features computed once and stored by ``sarl.model.features``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BeforeValidator, Field
from torch.utils.data import DataLoader

from . import engine
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, section, to_dict
from .data import (
    DATASET_KINDS,
    MultiLabelDataset,
    build_dataset,
    build_transforms,
    category_words,
    collate_skip_bad,
    load_mask,
    make_partial_labels,
    save_mask,
    train_val_split,
)
from .distributed import seed_everything
from .factory import create_model, get_model_config
from .features import (
    STORAGE_DTYPES,
    FeatureCache,
    FeatureDataset,
    Features,
    cache_key,
    key_digest,
    weights_digest,
)
from .losses import LOSSES, build_loss
from .model_config import ModelConfig
from .sarl import SARLModel
from .vocabulary import Category, Vocabulary

MASK_FILE = "partial_labels.npz"
CONFIG_FILE = "config.yaml"
LOSS_NAMES = tuple(LOSSES)


@section
class DataConfig:
    kind: Literal[DATASET_KINDS] = "synthetic"
    root: str | None = None  # data set folder (local path; the platform also accepts s3:// URIs)
    train_split: str = "train"
    test_split: str = "test"
    categories: list[str] | None = None  # column order; default: the data set's own list
    # Known-label proportion p of the MLR-PL protocol: each (image, class) entry kept with probability p.
    known_proportion: float = Field(0.3, gt=0, le=1)
    mask_seed: int = 0
    # Validation split carved from the (partially labelled) training set, used for model selection.
    val_fraction: float = Field(0.1, ge=0, lt=1)
    split_seed: int = 0
    augment: Literal["standard", "none"] = "standard"
    on_bad_image: Literal["error", "skip"] = "error"
    num_workers: int = Field(2, ge=0)
    options: dict = Field(default_factory=dict)  # kind-specific: num_images, seed, annotation_file, ...
    # Words to look up in the word vectors for category names that are not words ({"tvmonitor": "tv monitor"});
    # added to the kind's own mapping (VOC ships one, ``data.VOC_WORDS``).
    words: dict = Field(default_factory=dict)


@section
class LossConfig:
    name: Literal[LOSS_NAMES] = "asl"
    params: dict = Field(default_factory=dict)  # e.g. {gamma_neg: 2, gamma_pos: 1, margin: 0.05}
    completion: dict | None = None  # label completion: {warmup_epochs, t_pos, t_neg, weight}
    # Multiplies the whole loss (completion term included): DualCoOp's ``loss_w`` ("larger loss_w for smaller pp").
    weight: float = Field(1.0, gt=0)


@section
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.002, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    # ``lr`` is the learning rate for a global batch of ``lr_batch_size`` images (default: train.batch_size, i.e.
    # one worker). Data-parallel training with N workers steps on N x train.batch_size images at once, so the
    # rate is scaled by ``lr_scaling``: linear (Goyal et al. 2017; with sum-reduced losses and DDP's gradient
    # mean this keeps the update per image of the single-worker recipe), sqrt, or none.
    lr_batch_size: int | None = Field(None, gt=0)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"

    def effective_lr(self, batch_size: int, world_size: int = 1) -> float:
        """The rate used for a global batch of ``world_size * batch_size`` images."""
        ratio = world_size * batch_size / (self.lr_batch_size or batch_size)
        return self.lr * {"linear": ratio, "sqrt": ratio**0.5, "none": 1.0}[self.lr_scaling]


@section
class TrainConfig:
    epochs: int = Field(50, gt=0)
    batch_size: int = Field(32, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    seed: int = 0
    grad_clip: float | None = None
    progress: bool = True
    # Also score the (complete) test labels after every epoch, for the test-selected number the peers' tables
    # report (best test mAP over epochs). Model selection still uses validation only; this only measures.
    test_every_epoch: bool = False


@section
class CacheConfig:
    """Feature cache for a frozen visual tower (``sarl.model.features``): encode every image once, then train
    the decoupling, prompts and head from the stored features, across epochs, runs and sweep trials."""

    enabled: bool = False
    # Local directory; the platform also accepts s3://bucket/prefix (mirrored in a local directory).
    root: str = "~/.cache/sarl/features"
    # Fixed augmented views: with data.augment=standard, K > 1 caches K seeded augmentations of each training
    # image and epoch e trains on view e % K. 1 = no augmentation (random crops cannot be cached). With
    # data.augment=none every view would be the same image, so one is cached whatever K says.
    views: int = Field(1, gt=0)
    seed: int = 0  # seed of the augmented views
    dtype: Literal[STORAGE_DTYPES] = "float16"  # storage; float32 is exact, float16 half the size


def _cache_shorthand(value: Any) -> Any:
    return {"enabled": value} if isinstance(value, bool) else value


@section
class ExperimentConfig:
    name: str = "sarl"
    # The architecture: {name: tiny|rn50|rn101|vitb16|..., any ModelConfig field: value}.
    model: dict = Field(default_factory=lambda: {"name": "tiny"})
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = "runs"
    # ``cache: true`` is shorthand for ``cache: {enabled: true}`` (further cache keys need the mapping form).
    cache: Annotated[CacheConfig, BeforeValidator(_cache_shorthand, json_schema_input_type=CacheConfig | bool)] = (
        Field(default_factory=CacheConfig))

    def __post_init__(self) -> None:
        self.model = {"name": "tiny", **self.model}  # a model section without a name means the tiny default
        mcfg = self.model_config()  # unknown model names or fields fail now, not inside a worker
        if self.cache.enabled and mcfg.unfreeze != "none":
            raise ConfigError(f"cache.enabled needs a frozen visual tower, but model.unfreeze is {mcfg.unfreeze!r}: "
                              "set model.unfreeze=none, or disable the cache")
        try:
            build_loss(self.loss.name, completion=self.loss.completion, weight=self.loss.weight, **self.loss.params)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"loss: {exc}") from None

    def model_config(self) -> ModelConfig:
        overrides = dict(self.model)
        return get_model_config(overrides.pop("name"), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclasses.dataclass
class Splits:
    """The data of an experiment: image datasets from ``prepare_data``, feature datasets from ``prepare_cached``.

    ``source`` is the whole training split (partial labels, training transform) that ``train`` and ``val`` were
    carved from at ``train_indices`` / ``val_indices``: the feature cache keys on the split, not on the carve.
    """

    train: MultiLabelDataset | FeatureDataset
    val: MultiLabelDataset | FeatureDataset | None
    test: MultiLabelDataset | FeatureDataset
    categories: list[str]
    source: MultiLabelDataset | None = None
    train_indices: np.ndarray | None = None
    val_indices: np.ndarray | None = None


def prepare_data(cfg: ExperimentConfig, run_dir: str | Path | None = None) -> Splits:
    """Train (partial labels), validation (carved from train, same partial labels) and test (complete) sets.

    The partial-label mask is drawn once from ``data.mask_seed`` and saved as ``run_dir/partial_labels.npz``;
    when that file exists it is loaded instead, so a resumed run or another method sees the same mask.
    """
    d, mcfg = cfg.data, cfg.model_config()
    train_tf = build_transforms(mcfg.image_size, mcfg.mean, mcfg.std, train=True, augment=d.augment)
    eval_tf = build_transforms(mcfg.image_size, mcfg.mean, mcfg.std, train=False)
    options = dict(d.options)
    train = build_dataset(d.kind, d.root, d.train_split, transform=train_tf, categories=d.categories,
                          on_bad_image=d.on_bad_image, **options)
    test = build_dataset(d.kind, d.root, d.test_split, transform=eval_tf, categories=train.categories,
                         on_bad_image=d.on_bad_image, **options)
    mask_path = Path(run_dir) / MASK_FILE if run_dir is not None else None
    if mask_path is not None and mask_path.is_file():
        partial, meta = load_mask(mask_path)
        check_mask(mask_path, partial, meta, train.labels.shape, d.known_proportion, d.mask_seed, train.categories)
    else:
        partial = make_partial_labels(train.labels, d.known_proportion, d.mask_seed)
        if mask_path is not None:
            save_mask(mask_path, partial, {"proportion": d.known_proportion, "seed": d.mask_seed,
                                           "dataset": d.kind, "categories": train.categories})
    train = source = train.with_labels(partial)
    val, train_idx, val_idx = None, np.arange(len(train), dtype=np.int64), None
    if d.val_fraction > 0:
        train_idx, val_idx = train_val_split(len(train), d.val_fraction, d.split_seed)
        val = train.subset(val_idx).with_transform(eval_tf)
        train = train.subset(train_idx)
    return Splits(train, val, test, list(train.categories), source, train_idx, val_idx)


def check_mask(path: Path, partial: np.ndarray, meta: dict[str, Any], shape: tuple[int, ...], proportion: float,
               seed: int, categories: list[str]) -> None:
    """Refuse a saved mask drawn for another data set, proportion or seed (a reused run directory would
    otherwise silently train on the old mask); every mismatch is named."""
    found = {"shape": list(partial.shape), "proportion": meta.get("proportion"), "seed": meta.get("seed"),
             "categories": meta.get("categories", list(categories))}
    wanted = {"shape": list(shape), "proportion": proportion, "seed": seed, "categories": list(categories)}
    diffs = [f"{k} {found[k]!r} (job: {wanted[k]!r})" for k in wanted if found[k] != wanted[k]]
    if diffs:
        raise ValueError(f"{path} was drawn for another job: {'; '.join(diffs)}. Use a new run directory "
                         "(or run name), or restore the job's data settings")


def cache_disabled_reason(cfg: ExperimentConfig) -> str | None:
    """Why ``cfg.cache`` cannot be used although enabled (random augmentation), else None."""
    if cfg.cache.enabled and cfg.data.augment == "standard" and cfg.cache.views == 1:
        return ("feature cache disabled: data.augment=standard draws new random crops every epoch, which cached "
                "features cannot reproduce. Set data.augment=none to cache plain images, or cache.views=K (K > 1) "
                "to cache K fixed augmented views of every training image")
    return None


def prepare_cached(cfg: ExperimentConfig, splits: Splits, model: SARLModel, device: str | torch.device = "cpu",
                   parts: tuple[str, ...] = ("train", "val", "test"), cache: FeatureCache | None = None,
                   progress: bool = False) -> tuple[Splits, dict[str, Any]]:
    """``splits`` with the datasets named in ``parts`` replaced by cached features of ``model``'s visual tower.

    Returns the new splits and ``{"enabled", "hits", "misses", "reason"}`` (entries found / computed). One
    entry per (split, transform, views): train and validation share the training split's entry when the
    training transform is deterministic (``data.augment=none``), and carving another validation set hits.
    ``cache`` defaults to ``FeatureCache(cfg.cache.root)`` (a local path; the platform passes an S3-backed one).

    Under a ``torch.distributed`` process group every rank calls it: a missing entry is computed by all ranks
    together, each encoding one block of the items (``FeatureCache.get_or_compute``), and each rank holds the
    whole entry afterwards.
    """
    reason = cache_disabled_reason(cfg)
    if not cfg.cache.enabled or reason:
        if reason:
            warnings.warn(reason, UserWarning, stacklevel=2)
        return splits, {"enabled": False, "hits": 0, "misses": 0, "reason": reason}
    if not model.visual_frozen:
        raise ValueError("the feature cache needs a frozen visual tower (model.unfreeze=none)")
    c, d = cfg.cache, cfg.data
    cache = cache or FeatureCache(c.root)
    views = c.views if d.augment == "standard" else 1  # without augmentation, extra views would be identical
    weights = weights_digest(model.visual)
    source = splits.source
    # (part, image dataset to encode, split name, views, rows of that dataset, labels of the part)
    wanted: list[tuple[str, MultiLabelDataset, str, int, np.ndarray | None, np.ndarray]] = []
    if "train" in parts:
        ds = source if source is not None else splits.train
        wanted.append(("train", ds, d.train_split, views, splits.train_indices if source is not None else None,
                       splits.train.labels))
    if "val" in parts and splits.val is not None:
        ds = source.with_transform(splits.val.transform) if source is not None else splits.val
        wanted.append(("val", ds, d.train_split, 1, splits.val_indices if source is not None else None,
                       splits.val.labels))
    if "test" in parts:
        wanted.append(("test", splits.test, d.test_split, 1, None, splits.test.labels))

    entries: dict[str, tuple[Features, bool]] = {}
    result = dataclasses.replace(splits)
    for part, ds, split, v, rows, labels in wanted:
        key = cache_key(model, ds, split=split, kind=d.kind, root=d.root, options=d.options, views=v, seed=c.seed,
                        dtype=c.dtype, weights=weights)
        digest = key_digest(key)
        if digest not in entries:
            entries[digest] = cache.get_or_compute(model, ds, key, cfg.train.eval_batch_size, device,
                                                   num_workers=d.num_workers, progress=progress)
        features = entries[digest][0]
        setattr(result, part, FeatureDataset(features, labels, splits.categories, rows))
    hits = sum(hit for _, hit in entries.values())
    return result, {"enabled": True, "hits": hits, "misses": len(entries) - hits, "reason": None}


def make_loader(dataset: MultiLabelDataset, batch_size: int, shuffle: bool, num_workers: int,
                seed: int = 0, drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_skip_bad, drop_last=drop_last, generator=generator,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def experiment_vocabulary(cfg: ExperimentConfig, categories: list[str]) -> Vocabulary:
    """The training vocabulary: the data set's categories, with word lookups for names that are not words."""
    words = category_words(cfg.data.kind, cfg.data.words)
    unknown = sorted(set(cfg.data.words) - set(categories))
    if unknown:
        raise ConfigError(f"data.words names categories the data set does not have: {', '.join(unknown)}")
    return Vocabulary([Category(name=n, words=words.get(n)) for n in categories])


def build_components(cfg: ExperimentConfig, categories: list[str], steps_per_epoch: int, world_size: int = 1):
    """Model, loss, optimiser and per-step scheduler for an experiment on ``world_size`` data-parallel workers."""
    model = create_model(cfg.model_config(), experiment_vocabulary(cfg, categories))
    loss_fn = build_loss(cfg.loss.name, completion=cfg.loss.completion, weight=cfg.loss.weight,
                         **cfg.loss.params)
    o = cfg.optim
    lr = o.effective_lr(cfg.train.batch_size, world_size)
    optimizer = engine.build_optimizer(model, o.name, lr, o.weight_decay, o.momentum)
    total = steps_per_epoch * cfg.train.epochs
    scheduler = engine.build_scheduler(optimizer, o.scheduler, total, int(o.warmup_epochs * steps_per_epoch))
    return model, loss_fn, optimizer, scheduler


def fit(cfg: ExperimentConfig, run_dir: str | Path, device: str | torch.device = "cpu",
        log: Any = print, on_epoch: Callable[[SARLModel, int, Splits], dict[str, Any]] | None = None
        ) -> dict[str, Any]:
    """Train in this process, select the epoch with the best validation mAP, evaluate it on the test set.

    Writes ``config.yaml``, the mask, ``history.json``, ``best/`` (checkpoint) and ``results.json`` to ``run_dir``.
    ``on_epoch(model, epoch, splits)`` is called before training (epoch 0) and after each epoch's validation;
    what it returns is recorded in that epoch's history entry (epoch 0's as ``results["initial"]``), for
    measurements the engine does not make (``scripts/attention_entropy.py``).
    """
    import yaml

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    seed_everything(cfg.train.seed)
    splits = prepare_data(cfg, run_dir)
    t = cfg.train

    def loaders(splits: Splits, num_workers: int) -> tuple[DataLoader, DataLoader, DataLoader]:
        return (make_loader(splits.train, t.batch_size, True, num_workers, t.seed, drop_last=True),
                make_loader(splits.val or splits.test, t.eval_batch_size, False, num_workers),
                make_loader(splits.test, t.eval_batch_size, False, num_workers))

    train_loader, val_loader, test_loader = loaders(splits, cfg.data.num_workers)
    model, loss_fn, optimizer, scheduler = build_components(cfg, splits.categories, len(train_loader))
    model.to(device)
    splits, cache_stats = prepare_cached(cfg, splits, model, device, progress=t.progress)
    if cache_stats["enabled"]:  # same lengths, so the scheduler built above still fits
        log(f"[{cfg.name}] feature cache: {cache_stats['hits']} hit(s), {cache_stats['misses']} miss(es)")
        train_loader, val_loader, test_loader = loaders(splits, 0)  # rows come from a memory map: no workers
    initial = on_epoch(model, 0, splits) if on_epoch is not None else None
    best, history, start = None, [], time.perf_counter()
    for epoch in range(1, t.epochs + 1):
        stats = engine.train_one_epoch(model, train_loader, loss_fn, optimizer, device, epoch, scheduler,
                                       amp=t.amp, grad_clip=t.grad_clip, progress=t.progress,
                                       desc=f"{cfg.name} epoch {epoch}/{t.epochs}")
        val = engine.evaluate(model, val_loader, device, amp=t.amp, progress=t.progress, desc="validate")
        history.append({"epoch": epoch, "loss": stats["loss"], "val_mAP": val["mAP"],
                        "samples_per_s": stats["samples_per_s"], "lr": stats["lr"]})
        if t.test_every_epoch:
            history[-1]["test_mAP"] = engine.evaluate(model, test_loader, device, amp=t.amp, progress=False)["mAP"]
        if on_epoch is not None:
            history[-1].update(on_epoch(model, epoch, splits))
        log(f"[{cfg.name}] epoch {epoch}/{t.epochs}  loss {stats['loss']:.4f}  val mAP {val['mAP']:.2f}")
        if best is None or val["mAP"] > best["val_mAP"]:
            best = {"epoch": epoch, "val_mAP": val["mAP"]}
            save_checkpoint(model, run_dir / "best", extra={"epoch": epoch, "val_mAP": val["mAP"]})
    best_model = load_checkpoint(run_dir / "best", map_location=device)
    test = engine.evaluate(best_model, test_loader, device, amp=t.amp, progress=t.progress, desc="test")
    # Random scores give, per class, AP = its positive rate on average: the chance level of mAP.
    chance = float(100 * (splits.test.labels == 1).mean(axis=0).mean())
    results = {"name": cfg.name, "best_epoch": best["epoch"], "val_mAP": best["val_mAP"], "test": test,
               "chance_mAP": chance, "categories": splits.categories, "train_seconds": time.perf_counter() - start,
               "cache": cache_stats}
    if initial is not None:
        results["initial"] = initial
    if t.test_every_epoch:  # the peers' number: the best test mAP of any epoch (selected on test)
        results["test_selected_mAP"] = max(h["test_mAP"] for h in history)
    (run_dir / "history.json").write_text(json.dumps(history, indent=2))
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results
