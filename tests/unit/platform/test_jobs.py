"""Every job file users run validates, and jobs/demo.yaml is the demo's embedded default."""

from pathlib import Path

import pytest

from sarl.demo import DEMO_JOB
from sarl.platform.job import load_job

JOBS = sorted((Path(__file__).resolve().parents[3] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_job_files_validate(path):
    job = load_job(path)
    assert job.run_name and job.scaling.num_workers >= 1


def test_demo_yaml_matches_the_embedded_demo():
    path = next(p for p in JOBS if p.name == "demo.yaml")
    assert load_job(path) == load_job(None, base=DEMO_JOB)
