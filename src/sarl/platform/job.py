"""Job configuration for the Ray platform: an experiment plus how to run it on a cluster.

A job YAML (``jobs/*.yaml``) is an ``ExperimentConfig`` (model, data, loss, optim, train) with two more
sections: ``scaling`` (workers and their resources) and ``run`` (storage, failures, checkpoints kept).
``load_job`` validates the whole file before any worker starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field

from ..model.config import ConfigError, load_config, section
from ..model.data.build import check_options
from ..model.experiment import ExperimentConfig

ALIAS_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"


def _alias_name(alias: str) -> str:
    if re.fullmatch(ALIAS_PATTERN, alias) is None:
        raise ValueError("must be letters, digits, '-' or '_' (at most 64, not starting with '-' or '_')")
    if alias == "best":
        raise ValueError("is published after every run; name another alias")
    return alias


def _custom_resources(resources: dict[str, float]) -> dict[str, float]:
    if {"CPU", "GPU"} & set(resources):
        raise ValueError("names CPU or GPU: set scaling.cpus_per_worker / scaling.gpus_per_worker instead")
    return resources


AliasName = Annotated[str, AfterValidator(_alias_name), Field(json_schema_extra={"pattern": f"^{ALIAS_PATTERN}$"})]


@section
class ScalingSection:
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False  # NCCL + bf16 autocast on GPU workers, gloo on CPU
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float | None = Field(None, gt=0)  # default 1 when use_gpu
    # Custom Ray resources, e.g. {accelerator_type:A100: 0.1} (CPUs and GPUs are the fields above).
    resources_per_worker: Annotated[dict[str, float], AfterValidator(_custom_resources)] = Field(default_factory=dict)
    torch_threads: int | None = Field(None, gt=0)  # intra-op threads per CPU worker (default: cpus_per_worker)

    def worker_resources(self) -> dict[str, float]:
        """What one training worker asks Ray for (an evaluation task of the job asks for the same)."""
        gpus = {"GPU": self.gpus_per_worker or 1} if self.use_gpu else {}
        return {"CPU": self.cpus_per_worker, **gpus, **self.resources_per_worker}


@section
class RunSection:
    # Where Ray keeps the run (checkpoints, results): a local path or s3://bucket/prefix. The run lives in
    # <storage_path>/<name>; starting the same name again resumes from its latest checkpoint.
    storage_path: str = "runs/ray"
    name: str | None = None  # default: the job's name
    max_failures: int = Field(0, ge=-1, description="retries after a worker failure; -1: retry forever")
    keep_checkpoints: int = Field(2, gt=0)  # best-k by validation mAP
    # Rehearse recovery: rank 0 raises once in this epoch (a marker file under the run makes it once only).
    fail_once_at_epoch: int | None = Field(None, gt=0)
    log_every_epoch: bool = True
    # A run name that already has a checkpoint: ``auto`` resumes it if its stored job.yaml is this job (fields that
    # may change on resume aside: RESUME_IGNORED in train.py) and refuses, naming the differences, if not;
    # ``always`` resumes whatever changed (a warning names it); ``never`` refuses to touch an existing run.
    resume: Literal["auto", "always", "never"] = "auto"
    # ``async``: rank 0 uploads each epoch's checkpoint in the background while the next epoch trains (Train V2's
    # CheckpointUploadMode.ASYNC); ``sync``: every rank waits in ray.train.report until the upload is done.
    checkpoint_upload: Literal["async", "sync"] = "async"
    # After the run, its best checkpoint is published as alias ``best`` (<storage_path>/<name>/aliases/best.json,
    # what a Serve config points at) and under this name too when set (e.g. ``candidate``; see platform/aliases.py).
    alias: AliasName | None = None


@section
class JobConfig(ExperimentConfig):
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    address: str | None = None  # Ray cluster address; default $RAY_ADDRESS, else a local cluster

    @property
    def run_name(self) -> str:
        return self.run.name or self.name


def load_job(path: str | Path | None, overrides: Iterable[str] = (), base: Mapping[str, Any] | None = None,
             fixed: Mapping[str, Any] | None = None) -> JobConfig:
    """A validated ``JobConfig``: defaults <- ``base`` <- YAML file ``path`` <- ``key=value`` overrides <- ``fixed``."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"job file {path} does not exist")
    if path is not None:
        check_not_empty(path, "job file")
    return check_job(load_config(JobConfig, path, overrides, base=base, fixed=fixed))


def check_not_empty(path: str | Path, what: str) -> None:
    """Raise ``ConfigError`` if the YAML file at ``path`` holds nothing (empty, or only comments): running the
    defaults instead (a 50-epoch default sweep) is never what was meant."""
    if yaml.safe_load(Path(path).read_text()) is None:
        raise ConfigError(f"{what} {path} is empty; give a YAML mapping of settings (or leave out the file to "
                          "run the defaults)")


def check_job(job: JobConfig) -> JobConfig:
    """Checks across sections that the field checks cannot make: ``data.options`` against the data set kind."""
    try:
        check_options(job.data.kind, job.data.options)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return job


__all__ = ["ConfigError", "JobConfig", "RunSection", "ScalingSection", "check_job", "check_not_empty", "load_job"]
