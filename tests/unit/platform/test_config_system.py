"""One config system: every file users write is a pydantic section with a JSON schema, and bad values are named."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from sarl.cli import build_parser, main
from sarl.cli.config import SECTIONS
from sarl.cli.options import load_command
from sarl.model.config import ConfigError
from sarl.platform.complete import CompleteConfig
from sarl.platform.job import load_job
from sarl.platform.predict import PredictConfig
from sarl.platform.tune import load_sweep

JOBS = Path(__file__).resolve().parents[3] / "jobs"


def schema(kind, capsys):
    assert main(["config", "schema", kind]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", sorted(SECTIONS))
def test_every_kind_has_a_schema_that_refuses_unknown_keys(kind, capsys):
    document = schema(kind, capsys)
    assert document["additionalProperties"] is False and document["properties"]


def test_the_job_schema_states_each_fields_default_and_constraint(capsys):
    document = schema("job", capsys)
    proportion = document["$defs"]["DataConfig"]["properties"]["known_proportion"]
    assert proportion["default"] == 0.3 and proportion["exclusiveMinimum"] == 0 and proportion["maximum"] == 1
    assert document["$defs"]["LossConfig"]["properties"]["name"]["enum"][:2] == ["bce", "partial_bce"]
    assert document["$defs"]["RunSection"]["properties"]["max_failures"]["minimum"] == -1


@pytest.mark.parametrize("path", sorted(p for p in JOBS.glob("*.yaml") if not p.name.startswith("sweep_")
                                        and p.stem not in ("predict", "calibrate", "complete")), ids=lambda p: p.name)
def test_every_shipped_job_validates_against_the_schema(path, capsys, tmp_path):
    main(["config", "schema", "job", "--output", str(tmp_path / "job.json")])
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads((tmp_path / "job.json").read_text()))
    bad = {**yaml.safe_load(path.read_text()), "trian": {"epochs": 1}}
    with pytest.raises(jsonschema.ValidationError, match="trian"):
        jsonschema.validate(bad, json.loads((tmp_path / "job.json").read_text()))


@pytest.mark.parametrize("kind, path", [("sweep", "sweep_demo.yaml"), ("predict", "predict.yaml"),
                                        ("calibrate", "calibrate.yaml"), ("complete", "complete.yaml")])
def test_shipped_sweep_and_command_files_validate_against_their_schemas(kind, path, capsys):
    jsonschema.validate(yaml.safe_load((JOBS / path).read_text()), schema(kind, capsys))


@pytest.mark.parametrize("override, message", [
    ("scaling.num_workers=0", "scaling.num_workers: 0 should be greater than 0"),
    ("run.resume=sometimes", "run.resume: 'sometimes' is not one of 'auto', 'always' or 'never'"),
    ("run.alias=best", "run.alias: 'best' is published after every run"),
    ("run.alias=-x", "run.alias: '-x' must be letters, digits"),
    ("data.categories=[cat, 3]", "data.categories[1]: 3 should be a valid string"),
    ("cache.viewz=2", "unknown key in cache: cache.viewz (valid: dtype, enabled, root, seed, views)"),
    ("cache=maybe", "cache"),
])
def test_job_errors_name_the_dotted_key_and_the_value(override, message):
    with pytest.raises(ConfigError) as info:
        load_job(JOBS / "demo.yaml", [override])
    assert message in str(info.value)


def test_two_bad_values_are_both_named():
    with pytest.raises(ConfigError) as info:
        load_job(None, ["train.epochs=0", "optim.lr=-1", "train.batchsize=3"])
    text = str(info.value)
    assert text.startswith("unknown key in train: train.batchsize")
    assert "train.epochs: 0 should be greater than 0" in text
    assert "optim.lr: -1 should be greater than 0" in text  # the value as written


def test_the_cache_shorthand_and_the_fixed_values_of_a_caller():
    job = load_job(None, ["cache=true", "model.unfreeze=none", "data.known_proportion=0.5"],
                   fixed={"data": {"known_proportion": 0.2}})
    assert job.cache.enabled and job.data.known_proportion == 0.2  # the caller's fixed value wins over overrides


def test_a_sweep_value_out_of_range_is_named(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"job: {JOBS / 'demo.yaml'}\nspace: {{loss.name: {{choice: [asl]}}}}\n")
    with pytest.raises(ConfigError, match=r"scheduler\.reduction_factor: 1 should be greater than 1"):
        load_sweep(sweep, ["scheduler.reduction_factor=1"])


def test_command_flags_win_over_the_file_and_the_section_gives_the_rest(tmp_path):
    path = tmp_path / "predict.yaml"
    path.write_text("checkpoint: ckpt\ninput: images\noutput: out\nbatch-size: 8\nactors: 3\n")
    args = build_parser().parse_args(["predict", "--config", str(path), "--batch-size", "4", "--overwrite"])
    config = load_command(PredictConfig, args)
    assert (config.batch_size, config.actors, config.overwrite) == (4, 3, True)  # flag, file, flag
    assert (config.shard_size, config.format) == (1000, "parquet")  # the section's defaults


@pytest.mark.parametrize("text, flags, message", [
    ("checkpoint: c\nmanifest: m\noutput: o\nband: 0.7\n", [], "band: 0.7 should be less than 0.5"),
    ("checkpoint: c\nmanifest: m\noutput: o\nsugest: 5\n", [], "unknown key: sugest"),
    ("checkpoint: c\n", ["--output", "o"], "give --manifest (or a --config with them)"),
    ("checkpoint: c\nmanifest: m\noutput: o\n", ["--suggest", "-1"], "suggest: -1 should be greater than or equal"),
])
def test_command_file_errors_are_refused_before_ray_starts(tmp_path, capsys, monkeypatch, text, flags, message):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    path = tmp_path / "complete.yaml"
    path.write_text(text)
    assert main(["complete", "--config", str(path), *flags]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match=message.split(" (")[0].replace("+", r"\+")):
        load_command(CompleteConfig, build_parser().parse_args(["complete", "--config", str(path), *flags]))


def test_a_training_worker_and_an_evaluation_task_ask_for_the_same_resources():
    from sarl.platform.cluster import task_options
    from sarl.platform.train import scaling_config

    job = load_job(None, ["scaling.use_gpu=true", "scaling.gpus_per_worker=0.5", "scaling.cpus_per_worker=2",
                          "scaling.resources_per_worker={node_a: 0.1}"])
    assert scaling_config(job).resources_per_worker == {"CPU": 2.0, "GPU": 0.5, "node_a": 0.1}
    assert task_options(job) == {"num_cpus": 2.0, "num_gpus": 0.5, "resources": {"node_a": 0.1}}
    assert task_options(load_job(None))["num_gpus"] == 0
    with pytest.raises(ConfigError, match="scaling.resources_per_worker: .*set scaling.cpus_per_worker"):
        load_job(None, ["scaling.resources_per_worker={CPU: 4}"])
