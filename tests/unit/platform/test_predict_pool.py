"""``sarl predict`` without a cluster (issue 18, item 9): the scoring pool's bounds (it grows from ``min_actors`` to
``max_actors``; ``actors`` is a pool of fixed size) and resources, and the stages themselves, run in this process:
the decode task's uint8 images, normalised and scored by the actor, give the scores Serve's ``ImageScorer`` gives."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sarl.cli import main
from sarl.model import create_model
from sarl.model.checkpoint import save_checkpoint
from sarl.model.config import ConfigError, from_dict
from sarl.platform.aliases import identify
from sarl.platform.predict import PredictConfig, Score, decode_batch, stage_resources
from sarl.platform.serve.scoring import ImageScorer

PATHS = {"checkpoint": "c", "input": "i", "output": "o"}


@pytest.mark.parametrize("keys, images, sizes", [
    ({}, 150, (1, 1)), ({}, 2500, (1, 3)),  # by default, one more actor per 1000 images to score
    ({"min_actors": 2}, 150, (2, 2)), ({"min_actors": 2, "max_actors": 8}, 150, (2, 8)),
    ({"max_actors": 3}, 10**6, (1, 3)), ({"actors": 3}, 10**6, (3, 3)), ({"actors": 3, "min_actors": 3}, 1, (3, 3)),
])
def test_the_pool_grows_from_min_to_max_actors_and_actors_fixes_its_size(keys, images, sizes):
    _, actors = stage_resources(from_dict(PredictConfig, {**PATHS, "gpus_per_actor": 0, **keys}), images)
    assert (actors["compute"].min_size, actors["compute"].max_size) == sizes


@pytest.mark.parametrize("keys, resources", [
    ({"gpus_per_actor": 0}, (1.0, 0.0, 1.0)),  # CPU actors: decode tasks of their CPUs, so Ray Data fuses them
    ({"gpus_per_actor": 0, "cpus_per_actor": 2}, (2.0, 0.0, 2.0)),
    ({"gpus_per_actor": 0, "decode_cpus": 0.5}, (0.5, 0.0, 1.0)),  # kept apart
    ({"gpus_per_actor": 1}, (1.0, 1.0, 0.0)),  # GPU actors, fed by decode tasks on the CPUs
    ({"gpus_per_actor": 0.5, "cpus_per_actor": 1, "decode_cpus": 2}, (2.0, 0.5, 1.0)),
])
def test_decode_and_actor_resources(keys, resources):
    decode_cpus, actors = stage_resources(from_dict(PredictConfig, {**PATHS, **keys}), 100)
    assert (decode_cpus, actors["num_gpus"], actors["num_cpus"]) == resources


@pytest.mark.parametrize("keys, message", [
    ({"min_actors": 4, "max_actors": 2}, "min_actors (4) is over max_actors (2)"),
    ({"actors": 4, "max_actors": 8}, "actors: 4 is a pool of fixed size (min_actors = max_actors = actors); it "
                                     "cannot go with max_actors: 8"),
])
def test_pool_bounds_that_contradict_each_other_are_refused_in_one_line(keys, message, capsys):
    with pytest.raises(ConfigError) as info:
        from_dict(PredictConfig, {**PATHS, **keys})
    assert message in str(info.value)
    flags = [arg for key, value in {**PATHS, **keys}.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    assert main(["predict", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def encoded(kind: str, size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert("RGBA" if kind == "PNG" and seed % 2 else "RGB").save(out, format=kind)
    return out.getvalue()


def test_the_decode_task_sends_uint8_and_the_actor_scores_them_as_serve_does(tmp_path):
    """A quarter of float32's bytes leave the decode task; the actor normalises them to the very tensors Serve's
    transform gives (a photo-sized JPEG decoded at reduced scale, an RGBA PNG, a small one), so the same scores."""
    torch.manual_seed(0)
    checkpoint = str(save_checkpoint(create_model("tiny", ["ace", "king", "queen"]), tmp_path / "checkpoint"))
    files = {"photo.jpg": encoded("JPEG", (1024, 768), 0), "alpha.png": encoded("PNG", (90, 70), 1),
             "small.png": encoded("PNG", (48, 40), 2), "broken.jpg": encoded("JPEG", (64, 48), 3)[:200]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    scorer = ImageScorer(checkpoint, "cpu")
    size = scorer.model.config.image_size
    paths = np.array([str(tmp_path / name) for name in files], dtype=object)

    batch = decode_batch({"path": paths}, size, max_pixels=10**8)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 3, size, size)
    assert [bool(e) for e in batch["error"]] == [False, False, False, True]

    model, _, _ = identify(checkpoint)
    out = Score(checkpoint, model.resolved(), None, None, "cpu")(batch)
    bound = scorer.bind(scorer.model.vocabulary)
    expected = scorer.score(bound, [scorer.preprocess(data) for data in list(files.values())[:3]])
    names = [c.name for c in bound.vocabulary.categories]
    assert [json.loads(s) for s in out["scores"][:3]] == [{n: round(p, 6) for n, p in zip(names, row)}
                                                         for row in expected]
    assert out["scores"][3] is None and "cannot decode" in out["error"][3]
