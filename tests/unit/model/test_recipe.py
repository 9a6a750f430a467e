"""What a training recipe does to the model: train/eval modes, weight decay, learning-rate scaling, VOC words."""

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from sarl.model import create_model
from sarl.model.config import ConfigError, load_config
from sarl.model.data import VOC_CLASSES
from sarl.model.engine import build_optimizer
from sarl.model.experiment import ExperimentConfig, build_components
from sarl.model.vocabulary import MissingWordsError

NAMES = ["circle", "square", "red car"]


def test_last_block_trains_but_frozen_resnet_batchnorm_keeps_its_statistics():
    torch.manual_seed(0)
    model = create_model("tiny-rn", NAMES, unfreeze="last_block").train()
    visual = model.visual.visual
    frozen_bn, trained_bn = visual.layer1[0].bn1, visual.layer4[-1].bn1
    assert not frozen_bn.weight.requires_grad and trained_bn.weight.requires_grad
    assert not frozen_bn.training and trained_bn.training and model.prompts.training
    before = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(frozen_bn.running_mean, before[0])  # frozen layers normalise with their own statistics
    assert not torch.equal(trained_bn.running_mean, before[1])  # the trained block's BatchNorm does train
    model.eval()
    assert not any(m.training for m in model.modules())


def test_frozen_towers_stay_in_eval_mode_and_trainable_parts_train():
    model = create_model("tiny-rn", NAMES, unfreeze="none").train()
    assert not any(m.training for m in model.visual.modules()) and not any(m.training for m in model.text.modules())
    assert model.decoupling.training and model.head.training


def test_weight_decay_skips_biases_and_the_logit_scale():
    model = create_model("tiny", NAMES, unfreeze="none", learn_scale=True)
    optimizer = build_optimizer(model, "sgd", lr=0.1, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"head.log_scale", "head.bias"} <= plain
    assert {"prompts.ctx", "decoupling.visual_proj.weight", "decoupling.semantic_proj.weight"} <= decayed
    assert decayed | plain == {n for n, p in model.named_parameters() if p.requires_grad}
    # One SGD step with zero gradients moves decayed weights only: w <- w - lr * wd * w.
    bias, ctx = model.head.bias.detach().clone() + 1.0, model.prompts.ctx.detach().clone()
    with torch.no_grad():
        model.head.bias.copy_(bias)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    assert torch.equal(model.head.bias, bias)
    torch.testing.assert_close(model.prompts.ctx, ctx * (1 - 0.1 * 0.01))


@pytest.mark.parametrize("scaling,world,expected", [
    ("linear", 1, 0.002), ("linear", 4, 0.008), ("sqrt", 4, 0.004), ("none", 4, 0.002)])
def test_learning_rate_follows_the_global_batch(scaling, world, expected):
    cfg = load_config(ExperimentConfig, None, ["optim.lr=0.002", "train.batch_size=32", f"optim.lr_scaling={scaling}",
                                                "model.rank=8"])
    _, _, optimizer, _ = build_components(cfg, NAMES, steps_per_epoch=10, world_size=world)
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(expected)


def test_learning_rate_given_for_another_batch_is_rescaled():
    o = load_config(ExperimentConfig, None, ["optim.lr=0.002", "optim.lr_batch_size=32"]).optim
    assert o.effective_lr(batch_size=16, world_size=1) == pytest.approx(0.001)
    assert o.effective_lr(batch_size=32, world_size=4) == pytest.approx(0.008)


def _glove_without_voc_non_words(tmp_path) -> str:
    words = [w for name in VOC_CLASSES for w in ("dining table potted plant tv monitor".split()
                                                  if name in ("diningtable", "pottedplant", "tvmonitor") else [name])]
    rng = np.random.default_rng(0)
    kv = KeyedVectors(vector_size=6)
    kv.add_vectors(sorted(set(words)), rng.normal(size=(len(set(words)), 6)).astype(np.float32))
    assert "diningtable" not in kv.key_to_index
    path = tmp_path / "glove.txt"
    path.write_text("".join(f"{w} {' '.join(f'{x:.6f}' for x in kv[w])}\n" for w in kv.index_to_key))
    return str(path)


def test_voc_job_builds_with_word_vectors_that_lack_voc_non_words(tmp_path):
    vectors = _glove_without_voc_non_words(tmp_path)
    model_keys = ["model.semantic_source=word", f"model.word_vectors={vectors}", "model.rank=8"]
    cfg = load_config(ExperimentConfig, None, ["data.kind=voc", *model_keys])
    model, *_ = build_components(cfg, list(VOC_CLASSES), steps_per_epoch=1)
    assert model.vocabulary.names == list(VOC_CLASSES) and model.semantics.shape == (20, 6)
    assert model.vocabulary.categories[VOC_CLASSES.index("tvmonitor")].words == "tv monitor"
    # The same names without the mapping (another kind of data set) fail, naming the non-words.
    with pytest.raises(MissingWordsError, match="diningtable"):
        build_components(load_config(ExperimentConfig, None, model_keys), list(VOC_CLASSES), steps_per_epoch=1)
    custom = load_config(ExperimentConfig, None, [*model_keys, "data.words={diningtable: dining table, "
                                                               "pottedplant: potted plant, tvmonitor: tv monitor}"])
    assert build_components(custom, list(VOC_CLASSES), steps_per_epoch=1)[0].semantics.shape == (20, 6)
    with pytest.raises(ConfigError, match="teapot"):
        build_components(load_config(ExperimentConfig, None, [*model_keys, "data.words={teapot: tea pot}"]),
                         list(VOC_CLASSES), steps_per_epoch=1)
