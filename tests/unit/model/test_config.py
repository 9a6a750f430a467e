"""Typed config: YAML -> dataclasses, key=value overrides, errors that name the key."""

import pytest

from sarl.model.config import ConfigError, load_config, parse_overrides
from sarl.model.experiment import ExperimentConfig


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "name: x\nmodel: {name: tiny, rank: 16}\ndata: {known_proportion: 0.5}\n")
    cfg = load_config(ExperimentConfig, path, ["data.known_proportion=0.1", "loss.name=wan", "model.fusion=dot",
                                               "train.epochs=3", "loss.params={}"])
    assert cfg.data.known_proportion == 0.1 and cfg.loss.name == "wan" and cfg.train.epochs == 3
    assert cfg.model == {"name": "tiny", "rank": 16, "fusion": "dot"}
    assert cfg.model_config().rank == 16


@pytest.mark.parametrize("override,named", [
    (["data.known_proportion=1.5"], "data.known_proportion: 1.5 should be less than or equal to 1"),
    (["data.known_proportion=0"], "data.known_proportion"),
    (["loss.name=focal"], "loss.name: 'focal' is not one of"),
    (["data.kind=imagenet"], "data.kind"),
    (["trian.epochs=3"], "unknown key: trian"),
    (["train.epoch=3"], "unknown key in train: train.epoch"),
    (["train.epochs=three"], "train.epochs: 'three' should be a valid integer"),
    (["model.name=rn999"], "unknown model 'rn999'"),
    (["model.ranq=3"], "ranq"),
    (["loss.params={gama: 1}"], "gama"),
])
def test_bad_values_are_named(override, named):
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentConfig, None, override)
    assert named in str(info.value)


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=null", "e=text"]) == {"a": {"b": 1, "c": [1, 2]}, "d": None,
                                                                           "e": "text"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])
