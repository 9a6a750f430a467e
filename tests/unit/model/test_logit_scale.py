"""The scale s of the score s * cos(f, t): fixed by default, because the shipped SGD recipe collapses a learnt s.

A toy with CLIP-like geometry: image and text features share a common direction, so every initial cosine is about
0.2 (as CLIP's are) and every initial logit about +4; text vectors are learnt (standing in for the prompt contexts)
with the optimiser, the loss and its weight of ``jobs/voc2007_rn101.yaml``, at 10% known labels.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from sarl.model.engine import build_optimizer
from sarl.model.factory import get_model_config
from sarl.model.heads import ScoreHead
from sarl.model.losses import build_loss

JOB = Path(__file__).resolve().parents[3] / "jobs" / "voc2007_rn101.yaml"
B, C, D, KNOWN, STEPS = 32, 80, 64, 0.1, 1500


def _ap(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """mAP in percent, written out: per class, the mean over positives of the precision at their rank."""
    aps = []
    for c in range(labels.shape[1]):
        order = torch.argsort(scores[:, c], descending=True)
        hits = labels[order, c]
        if hits.sum() == 0:
            continue
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return 100 * sum(aps) / len(aps)


def _train(learn_scale: bool | None) -> tuple[float, float, float]:
    """(s after training, test mAP, mean initial cosine) for the shipped SGD recipe on the toy."""
    job = yaml.safe_load(JOB.read_text())
    gen = torch.Generator().manual_seed(0)
    common = F.normalize(torch.randn(D, generator=gen), dim=0)
    protos = F.normalize(torch.randn(C, D, generator=gen), dim=-1)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.rand(n, C, generator=gen) < 0.04).float()
        return 2.0 * common + 1.5 * y @ protos + 0.3 * torch.randn(n, D, generator=gen), y

    kwargs = {} if learn_scale is None else {"learn_scale": learn_scale}
    head = ScoreHead("global", C, get_model_config("rn101").logit_scale, **kwargs)
    model = nn.Module()
    model.head = head
    model.text = nn.Parameter(F.normalize(common + 2.2 * torch.randn(C, D, generator=gen) / math.sqrt(D), dim=-1))
    optim = job["optim"]
    optimizer = build_optimizer(model, optim["name"], lr=optim["lr"], weight_decay=optim["weight_decay"])
    loss_fn = build_loss(job["loss"]["name"], weight=job["loss"].get("weight", 1.0), **job["loss"]["params"])
    x_test, y_test = batch(2000)
    with torch.no_grad():
        initial_cos = float(F.normalize(x_test, dim=-1).matmul(F.normalize(model.text, dim=-1).t()).mean())
    for _ in range(STEPS):
        x, y = batch(B)
        targets = torch.where(torch.rand(B, C, generator=gen) < KNOWN, y, -1.0)
        loss = loss_fn(head(model.text, None, x), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(head.scale), _ap(head(model.text, None, x_test), y_test), initial_cos


def test_the_shipped_sgd_recipe_learns_on_clip_like_features_with_the_default_scale():
    assert yaml.safe_load(JOB.read_text())["optim"]["name"] == "sgd"
    scale, test_map, initial_cos = _train(learn_scale=None)  # the default
    assert 0.1 < initial_cos < 0.3  # CLIP-like, not the ~0 cosines of random towers
    assert scale == pytest.approx(20.0)  # fixed: s stays where CLIP-style heads put it
    assert test_map > 35.0  # chance is about 4.5 (4% positives): the prompts and the bias learn


def test_a_learnt_scale_collapses_under_the_same_recipe():
    """Why the default is fixed: the gradient into log s sums over every known entry and drives s towards 0."""
    scale, test_map, _ = _train(learn_scale=True)
    assert scale < 1.0
    assert test_map < 10.0
