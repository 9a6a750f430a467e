"""The in-process pipeline: data + saved mask + model + engine loops + best checkpoint."""

import json

import numpy as np
import pytest
import torch

from sarl.model.checkpoint import load_checkpoint
from sarl.model.config import load_config
from sarl.model.data import load_mask, save_mask
from sarl.model.experiment import MASK_FILE, ExperimentConfig, fit, prepare_data

SMALL = ["data.options={num_images: 120, image_size: 64}", "data.num_workers=0", "data.augment=none",
         "train.batch_size=16", "train.progress=false", "model.rank=8", "optim.name=adamw", "optim.lr=0.003"]


def test_fit_writes_best_checkpoint_mask_and_results(tmp_path):
    cfg = load_config(ExperimentConfig, None, [*SMALL, "train.epochs=2"])
    seen = []

    def on_epoch(model, epoch, splits):  # a measurement of the model as it trains, recorded in the history
        seen.append((epoch, model.training, len(splits.test)))
        return {"ctx_norm": float(model.prompts.ctx.norm())}

    results = fit(cfg, tmp_path, log=lambda *_: None, on_epoch=on_epoch)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert [e for e, _, _ in seen] == [0, 1, 2] and all(n == 120 for *_, n in seen)
    assert results["initial"]["ctx_norm"] != history[-1]["ctx_norm"]  # measured on the training model
    assert results["val_mAP"] == max(h["val_mAP"] for h in history)
    assert 0 <= results["test"]["mAP"] <= 100 and len(results["test"]["AP"]) == 8
    mask, meta = load_mask(tmp_path / MASK_FILE)
    assert meta["proportion"] == 0.3 and mask.shape == (120, 8)
    model = load_checkpoint(tmp_path / "best")
    assert model.vocabulary.names == results["categories"]


def test_mask_is_drawn_once_and_reused(tmp_path):
    cfg = load_config(ExperimentConfig, None, SMALL)
    first = prepare_data(cfg, tmp_path)
    saved, _ = load_mask(tmp_path / MASK_FILE)
    saved[saved == -1] = 0  # tamper: a reused mask must come from the file, not from the seed

    save_mask(tmp_path / MASK_FILE, saved, {"proportion": 0.3, "seed": 0})
    second = prepare_data(cfg, tmp_path)
    assert (first.train.labels == -1).any() and not (second.train.labels == -1).any()
    with pytest.raises(ValueError, match=r"proportion 0.3 \(job: 0.5\)"):
        prepare_data(load_config(ExperimentConfig, None, [*SMALL, "data.known_proportion=0.5"]), tmp_path)
    with pytest.raises(ValueError, match=r"seed 0 \(job: 7\)"):  # same proportion, another mask seed
        prepare_data(load_config(ExperimentConfig, None, [*SMALL, "data.mask_seed=7"]), tmp_path)


def test_validation_split_is_carved_from_train_with_partial_labels(tmp_path):
    cfg = load_config(ExperimentConfig, None, [*SMALL, "data.val_fraction=0.25"])
    splits = prepare_data(cfg, tmp_path)
    assert len(splits.train) == 90 and len(splits.val) == 30 and len(splits.test) == 120
    known = np.concatenate([splits.train.labels, splits.val.labels]) >= 0
    assert 0.2 < known.mean() < 0.4  # the mask covers validation too: model selection sees partial labels
    assert (splits.test.labels >= 0).all()  # test labels are complete


def test_training_reduces_the_loss_on_a_fixed_batch():
    from sarl.model import create_model
    from sarl.model.losses import build_loss

    torch.manual_seed(0)
    model = create_model("tiny", ["a", "b", "c"])
    images, targets = torch.randn(8, 3, 64, 64), torch.randint(0, 2, (8, 3)).float()
    targets[0, 0] = -1
    loss_fn = build_loss("asl")
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = loss_fn(model(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_fit_from_the_feature_cache_learns_hits_on_rerun_and_matches_image_training(tmp_path):
    frozen = [*SMALL, "train.epochs=4", "model.unfreeze=none"]
    cfg = load_config(ExperimentConfig, None, [*frozen, "cache.enabled=true", f"cache.root={tmp_path / 'cache'}"])
    first = fit(cfg, tmp_path / "one", log=lambda *_: None)
    assert first["cache"] == {"enabled": True, "hits": 0, "misses": 2, "reason": None}  # train split, test split
    assert first["test"]["mAP"] > first["chance_mAP"] + 5
    second = fit(cfg, tmp_path / "two", log=lambda *_: None)
    assert (second["cache"]["hits"], second["cache"]["misses"]) == (2, 0)
    assert second["val_mAP"] == first["val_mAP"] and second["test"]["mAP"] == first["test"]["mAP"]
    # Training from (float16) features is training from images: the same run, up to feature rounding.
    images = fit(load_config(ExperimentConfig, None, frozen), tmp_path / "images", log=lambda *_: None)
    assert images["cache"]["enabled"] is False
    assert first["test"]["mAP"] == pytest.approx(images["test"]["mAP"], abs=0.5)
    assert load_checkpoint(tmp_path / "one" / "best").visual_frozen  # checkpoints stay image models


def test_fit_learns_on_the_shipped_sgd_recipe(tmp_path):
    """The paper jobs' recipe (SGD, momentum 0.9, lr 0.002 for a batch of 32, cosine, summed ASL) on frozen
    towers, as the jobs train: test mAP well above the chance level of the same test labels."""
    recipe = ["optim.name=sgd", "optim.lr=0.002", "optim.lr_batch_size=32", "optim.momentum=0.9",
              "optim.weight_decay=0.0005", "optim.scheduler=cosine", "loss.name=asl", "loss.params.reduction=sum"]
    cfg = load_config(ExperimentConfig, None, [*SMALL, *recipe, "data.options={num_images: 240, image_size: 64}",
                                               "train.batch_size=32", "train.epochs=6", "data.known_proportion=0.5",
                                               "model.unfreeze=none"])
    results = fit(cfg, tmp_path, log=lambda *_: None)
    assert results["chance_mAP"] == pytest.approx(24.9, abs=0.5)
    assert results["test"]["mAP"] > results["chance_mAP"] + 8  # measured: 36.7 against 24.9
