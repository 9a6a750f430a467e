"""Every job and sweep file users run validates, and jobs/demo.yaml is the demo's embedded default."""

from pathlib import Path

import pytest

from sarl.demo import DEMO_JOB
from sarl.model.config import ConfigError
from sarl.platform.job import load_job
from sarl.platform.tune import load_sweep, trial_job

FILES = sorted((Path(__file__).resolve().parents[3] / "jobs").glob("*.yaml"))
COMMANDS = {"predict.yaml": "predict", "calibrate.yaml": "calibrate", "complete.yaml": "complete"}  # --config files
JOBS = [p for p in FILES if not p.name.startswith("sweep_") and p.name not in COMMANDS]
SWEEPS = [p for p in FILES if p.name.startswith("sweep_")]


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_job_files_validate(path):
    job = load_job(path)
    assert job.run_name and job.scaling.num_workers >= 1


def test_demo_yaml_matches_the_embedded_demo():
    path = next(p for p in JOBS if p.name == "demo.yaml")
    assert load_job(path) == load_job(None, base=DEMO_JOB)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_files_validate_every_value_of_their_space(path):
    sweep, job = load_sweep(path)  # check_space builds a job for each choice and both ends of each range
    assert sweep.space and job["scaling"]["num_workers"] == sweep.resources.num_workers


def test_a_sweep_value_that_makes_a_bad_job_is_refused_before_any_trial(tmp_path):
    bad = tmp_path / "sweep.yaml"
    demo = Path(__file__).resolve().parents[3] / "jobs" / "demo.yaml"
    bad.write_text(f"job: {demo}\nspace:\n  loss.name: {{choice: [asl, focal]}}\n"
                   "  data.known_proportion: {uniform: [0.1, 1.5]}\n")
    with pytest.raises(ConfigError) as info:
        load_sweep(bad)
    assert "space.loss.name='focal'" in str(info.value) and "space.data.known_proportion=1.5" in str(info.value)


def test_trial_job_applies_only_active_conditional_parameters():
    space = {"loss.name": {"choice": ["asl", "wan"]}, "loss.params.gamma_neg": {"uniform": [1, 4],
                                                                                "when": {"loss.name": "asl"}}}
    assert trial_job({}, space, {"loss.name": "asl", "loss.params.gamma_neg": 3.0}).loss.params == {"gamma_neg": 3.0}
    assert trial_job({}, space, {"loss.name": "wan", "loss.params.gamma_neg": 3.0}).loss.params == {}
    base = {"loss": {"name": "asl", "params": {"margin": 0.1}}}  # the base loss keeps its params, others drop them
    assert trial_job(base, space, {"loss.name": "asl", "loss.params.gamma_neg": 3.0}).loss.params == {
        "margin": 0.1, "gamma_neg": 3.0}
    assert trial_job(base, space, {"loss.name": "wan"}).loss.params == {}



@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_config_files_name_only_known_options_and_every_required_one(name):
    from sarl.cli import build_parser
    from sarl.cli.options import load_command
    from sarl.platform.complete import CalibrateConfig, CompleteConfig
    from sarl.platform.predict import PredictConfig

    path = next(p for p in FILES if p.name == name)
    args = build_parser().parse_args([COMMANDS[name], "--config", str(path)])
    section = {"predict": PredictConfig, "calibrate": CalibrateConfig, "complete": CompleteConfig}[COMMANDS[name]]
    config = load_command(section, args)  # unknown keys, bad values and missing required options all raise
    assert config.checkpoint == "runs/demo/serve/checkpoint"
