"""A sweep resumes only when asked and only as the sweep it was: Tune's pickled state is never loaded otherwise."""

from __future__ import annotations

import json
import pathlib
import pickle
from pathlib import Path

import pytest

from sarl.model.config import ConfigError, from_dict, to_dict
from sarl.platform.cluster import absolute_paths
from sarl.platform.job import JobConfig
from sarl.platform.tune import SWEEP_FILE, load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[3]


class RunsCodeWhenUnpickled:
    """What someone who can write the sweep's storage could put in tuner.pkl: unpickling it touches a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A sweep file, an existing experiment of its name whose tuner.pkl runs code, and Ray that must not start."""
    import ray

    from sarl.platform import cluster

    def never(*args, **kwargs):
        raise AssertionError("Ray was started for a sweep that should have been refused before")

    monkeypatch.setattr(ray, "init", never)
    monkeypatch.setattr(cluster, "init_ray", never)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"name: planted\njob: {REPO / 'jobs' / 'demo.yaml'}\nstorage_path: {tmp_path / 'tune'}\n"
                          "space: {loss.name: {grid: [asl, wan]}}\n")
    experiment = tmp_path / "tune" / "planted"
    experiment.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(RunsCodeWhenUnpickled(marker)))
    return sweep_file, experiment, marker


def test_an_existing_sweep_is_not_resumed_unless_asked(planted):
    sweep_file, _, marker = planted
    sweep, job = load_sweep(sweep_file)
    with pytest.raises(ConfigError, match=r"exists already: rerun with --resume .* resume only a sweep whose "
                                          r"storage you trust"):
        run_sweep(sweep, job)
    assert not marker.exists()


def test_a_resume_of_another_sweep_is_refused_naming_what_differs(planted):
    sweep_file, experiment, marker = planted
    sweep, job = load_sweep(sweep_file, ["num_samples=2", "overrides.train.epochs=3"])
    stored, stored_job = load_sweep(sweep_file)
    stored_job = to_dict(absolute_paths(from_dict(JobConfig, stored_job)))  # as run_sweep records it
    (experiment / SWEEP_FILE).write_text(json.dumps({"sweep": to_dict(stored), "job": stored_job}))
    with pytest.raises(ConfigError) as info:
        run_sweep(sweep, job, resume=True)
    message = str(info.value)
    assert "num_samples: 8 -> 2" in message and "job.train.epochs: 30 -> 3" in message
    assert not marker.exists()
    # what may change on a resume does not count (the next step would be Tune's restore: Ray, refused here)
    same, same_job = load_sweep(sweep_file, ["max_concurrent_trials=1", f"output_dir={experiment.parent}"])
    with pytest.raises(AssertionError, match="Ray was started"):
        run_sweep(same, same_job, resume=True)
    assert not marker.exists()
