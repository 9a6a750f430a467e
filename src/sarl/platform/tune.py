"""``sarl tune``: sweeps on Ray Tune over partial-label losses, fusion settings and optimiser parameters.

Ray 2.60's pattern (Train V2): Tune runs one small function per trial, and that function builds and fits a
``TorchTrainer`` running the same ``train_loop_per_worker`` as ``sarl train``; a ``TuneReportCallback`` passes
each epoch's report (``val_mAP`` ...) to Tune, which schedules (ASHA) and searches. So a trial is exactly a
``sarl train`` run of its job, and the best trial's job is written out ready to run with ``sarl train``.

A sweep file (``jobs/sweep_*.yaml``)::

    name: sweep_demo
    job: demo.yaml                 # the job every trial starts from (relative to the sweep file)
    overrides: {train: {epochs: 6}}
    space:                         # dotted job keys -> a sampler; `when` makes a parameter conditional
      loss.name: {choice: [asl, wan]}
      loss.params.gamma_neg: {uniform: [1, 4], when: {loss.name: asl}}
      model.fusion: {choice: [bilinear, dot]}
    num_samples: 8
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2}

Samplers: ``choice``, ``grid`` (every value), ``uniform``, ``loguniform``, ``randint``. The sweep lives in
``<storage_path>/<name>`` (local or ``s3://``); running the same sweep again with ``resume`` (``sarl tune
--resume``) continues it there: finished trials are kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from ..model.config import ConfigError, from_dict, load_yaml, merge, section, to_dict
from . import storage
from .job import JobConfig, check_job, check_not_empty

log = logging.getLogger("sarl.tune")

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
TRIAL_DRIVER_CPUS = 0.1  # the default resources.driver_cpus
DRIVER_FIELDS = ("driver_cpus", "driver_resources")  # ResourcesSection fields that are not the trial job's scaling
# What Tune would copy from the driver's environment into every trial actor's runtime_env (see run_sweep).
CREDENTIAL_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"})
# The sweep and its base job as requested, plain JSON beside Tune's state: what a resume is checked against before
# Tune unpickles anything. Fields a resume may change: where the tables go, how many trials run at once.
SWEEP_FILE = "sweep.json"
SWEEP_RESUME_IGNORED = ("output_dir", "max_concurrent_trials")


@section
class SchedulerSection:
    name: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, gt=0)  # epochs every trial runs before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)


@section
class SearchSection:
    name: Literal["random", "optuna"] = "random"  # optuna: pip install optuna
    seed: int | None = 0


@section
class ResourcesSection:
    """Per trial: the TorchTrainer's workers (``scaling`` of the trial's job) and the trial's driver.

    The driver is the trial function that waits on its TorchTrainer; Tune needs it to ask for some resource. Its
    ``driver_cpus`` come out of the trial's budget: each worker asks for ``cpus_per_worker - driver_cpus``, so a
    node that holds a driver still fits a worker of the trial's size (whole-node workers do not starve). Or put
    the drivers on the head: ``driver_cpus: 0`` and ``driver_resources: {sarl_driver: 0.01}``, a custom resource
    only the head advertises (``ray start --head --resources='{"sarl_driver": 1}'``); workers then get all of
    ``cpus_per_worker``.
    """

    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    gpus_per_worker: float | None = None
    driver_cpus: float = Field(TRIAL_DRIVER_CPUS, ge=0)
    driver_resources: dict = Field(default_factory=dict)  # custom Ray resources of the driver, e.g. {sarl_driver: 0.01}

    def __post_init__(self) -> None:
        if self.driver_cpus >= self.cpus_per_worker:
            raise ConfigError(f"resources.driver_cpus ({self.driver_cpus}) must be below resources.cpus_per_worker "
                              f"({self.cpus_per_worker}): the driver's CPU is taken from each worker's")
        if self.driver_cpus == 0 and not any(v > 0 for v in self.driver_resources.values()):
            raise ConfigError("resources.driver_cpus is 0 and resources.driver_resources asks for nothing: a trial "
                              "driver must ask for some resource (Tune refuses an empty request)")

    def trial_scaling(self) -> dict[str, Any]:
        """The trial job's ``scaling``: the workers' share of the budget."""
        scaling = {k: v for k, v in to_dict(self).items() if k not in DRIVER_FIELDS}
        scaling["cpus_per_worker"] = self.cpus_per_worker - self.driver_cpus
        return scaling

    def driver(self) -> dict[str, float]:
        """What each trial's driver asks Tune for (``tune.with_resources``)."""
        return {"cpu": self.driver_cpus, **self.driver_resources}


@section
class SweepConfig:
    name: str = "sweep"
    job: str | None = None  # base job YAML; relative paths are relative to the sweep file
    overrides: dict = Field(default_factory=dict)  # job fields every trial shares
    space: dict = Field(default_factory=dict)  # dotted job key -> {sampler: args, when: {key: value(s)}}
    metric: str = "val_mAP"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, gt=0)
    max_concurrent_trials: int = Field(2, gt=0)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    search: SearchSection = Field(default_factory=SearchSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    storage_path: str = "runs/tune"  # local path or s3://bucket/prefix; the sweep lives in <storage_path>/<name>
    output_dir: str | None = None  # tables, best job and plot; default <storage_path>/<name>/results (local)

    def __post_init__(self) -> None:
        problems = []
        for key, spec in self.space.items():
            if not isinstance(spec, Mapping):
                problems.append(f"space.{key}: expected a mapping like {{choice: [...]}}, got {spec!r}")
                continue
            samplers = [s for s in spec if s in SAMPLERS]
            unknown = [k for k in spec if k not in (*SAMPLERS, "when")]
            if len(samplers) != 1 or unknown:
                problems.append(f"space.{key}: needs exactly one of {', '.join(SAMPLERS)} (and optionally "
                                f"'when'), got {sorted(spec)}")
        if self.search.name == "optuna" and any("grid" in s for s in self.space.values() if isinstance(s, Mapping)):
            problems.append("search optuna cannot take 'grid' entries; use choice")
        if problems:
            raise ConfigError("; ".join(problems))


# ------------------------------------------------------------------------------------------- configuration
def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepConfig, dict[str, Any]]:
    """The sweep and the base job (as a plain dict, validated) of a sweep file."""
    from ..model.config import parse_overrides

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    check_not_empty(path, "sweep file")
    sweep = from_dict(SweepConfig, merge(load_yaml(path), parse_overrides(overrides)))
    base: dict[str, Any] = {}
    if sweep.job:
        job_path = Path(sweep.job) if Path(sweep.job).is_absolute() else path.parent / sweep.job
        if not job_path.is_file():
            raise ConfigError(f"{path}: job file {job_path} does not exist")
        check_not_empty(job_path, "job file")
        base = load_yaml(job_path)
    job = merge(base, sweep.overrides)
    # Trials train with the sweep's resources; every sampled value must make a valid job on its own.
    job = merge(job, {"scaling": sweep.resources.trial_scaling()})
    check_space(sweep, job)
    return sweep, to_dict(check_job(from_dict(JobConfig, job)))


def _kind(spec: Mapping[str, Any]) -> str:
    """The sampler of a space entry (``__post_init__`` checked there is exactly one)."""
    return next(s for s in spec if s in SAMPLERS)


def _active(spec: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    """Whether a conditional parameter applies: every ``when`` key has (one of) the given value(s)."""
    for key, wanted in (spec.get("when") or {}).items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if params.get(key) not in allowed:
            return False
    return True


def trial_job(job: Mapping[str, Any], space: Mapping[str, Any], params: Mapping[str, Any]) -> JobConfig:
    """The job of one trial: the base job with each active sampled parameter set at its dotted key.

    A sampled ``loss.name`` other than the base job's starts from that loss's defaults: the base job's
    ``loss.params`` belong to its own loss (ASL's gammas mean nothing to ``wan``).
    """
    job = dict(job)
    base_loss = (job.get("loss") or {}).get("name")
    if params.get("loss.name", base_loss) != base_loss:
        job["loss"] = {**job.get("loss", {}), "params": {}}
    update: dict[str, Any] = {}
    for key, value in params.items():
        if not _active(space.get(key, {}), params):
            continue
        node = update
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return from_dict(JobConfig, merge(job, update))


def _sampler(spec: Mapping[str, Any]) -> Any:
    from ray import tune

    kind = _kind(spec)
    args = spec[kind]
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "grid":
        return tune.grid_search(list(args))
    low, high = args
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](low, high)


def _probe_values(spec: Mapping[str, Any]) -> list[Any]:
    """Values a sampler can give that are worth checking: every choice, both ends of a range."""
    kind = _kind(spec)
    if kind in ("choice", "grid"):
        return list(spec[kind])
    low, high = spec[kind]
    return [low, high - 1] if kind == "randint" else [low, high]


def check_space(sweep: SweepConfig, job: Mapping[str, Any]) -> None:
    """Every value a sampler can give must make a valid job (with its ``when`` conditions met): fail now,
    before any trial starts, instead of in trial 7 an hour later."""
    problems = []
    for key, spec in sweep.space.items():
        when = {k: (v[0] if isinstance(v, list) else v) for k, v in (spec.get("when") or {}).items()}
        for value in _probe_values(spec):
            params = {**when, key: value}
            try:
                trial_job(job, sweep.space, params)
            except (ConfigError, ValueError, TypeError) as e:
                problems.append(f"space.{key}={value!r}: {e}")
    if problems:
        raise ConfigError("search space gives invalid jobs:\n" + "\n".join(f"  - {p}" for p in problems))


# ------------------------------------------------------------------------------------------- one trial
def run_trial(params: dict[str, Any], job: dict[str, Any], space: dict[str, Any], train_storage: str) -> None:
    """Tune's function for one trial: the trial's job, fitted by a TorchTrainer that reports to Tune.

    ``params`` are the sampled values (Tune's config); the base job, the space and where Train keeps the
    trials' runs are the same for every trial and come through ``tune.with_parameters``.
    """
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import run_config, scaling_config, train_loop_per_worker

    job = trial_job(job, space, params)
    job.run.storage_path = train_storage
    job.run.name = tune.get_context().get_trial_id()  # a resumed trial continues its own Train run
    # s3:// data stays a URI: each node's workers copy it (train_loop_per_worker), not this trial driver's node.
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"job": to_dict(job)},
                           scaling_config=scaling_config(job),
                           run_config=run_config(job, callbacks=[TuneReportCallback()]))
    trainer.fit()


# ------------------------------------------------------------------------------------------- the sweep
def _tune_config(sweep: SweepConfig, max_epochs: int, train_storage: str) -> Any:
    from ray import tune

    scheduler = None
    if sweep.scheduler.name == "asha":
        from .asha import EpochASHA

        # On the reported epoch, and refilled from the trials' histories when the sweep is resumed (see asha.py).
        scheduler = EpochASHA(train_storage, max_t=max_epochs, grace_period=sweep.scheduler.grace_period,
                              reduction_factor=sweep.scheduler.reduction_factor)
    if sweep.search.name == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise ConfigError(f"search optuna needs the optuna package ({e}); pip install optuna") from None
        return tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                               max_concurrent_trials=sweep.max_concurrent_trials, scheduler=scheduler,
                               search_alg=OptunaSearch(seed=sweep.search.seed))
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Random and grid search: the generator takes the concurrency limit itself (TuneConfig's would be ignored).
    search = BasicVariantGenerator(random_state=sweep.search.seed, max_concurrent=sweep.max_concurrent_trials)
    return tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                           scheduler=scheduler, search_alg=search)


def _has_dashboard() -> bool:
    """Whether the connected cluster runs a dashboard (which serves the State API Train's cleaner asks)."""
    try:  # a private API; when it moves, assume Ray's default (a dashboard runs)
        from ray._private.worker import get_dashboard_url

        return bool(get_dashboard_url())
    except Exception:  # noqa: BLE001
        return True


def run_sweep(sweep: SweepConfig, job: dict[str, Any], address: str | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Run the sweep, or with ``resume`` continue the one of its name; write the results; returns {trials, best,
    best_job, output_dir}.

    Resuming loads Tune's pickled state (``tuner.pkl``, the trials' state) from the sweep's storage, so whoever
    can write there can run code in this driver: a sweep resumes only when asked, and only after its stored
    ``sweep.json`` (plain JSON) is found to be this sweep, both checked before Ray starts.
    """
    from ray import tune

    from .cluster import absolute_paths, init_ray, signal_handlers_kept

    storage.check_writable(sweep.storage_path)
    job = to_dict(absolute_paths(from_dict(JobConfig, job)))  # trials run in their own working directories
    filesystem, path = storage.pyarrow_filesystem(sweep.storage_path)
    if filesystem is None:
        path = str(storage.local_path(path))
    experiment = f"{path.rstrip('/')}/{sweep.name}"
    requested = {"sweep": to_dict(sweep), "job": job}
    restore = tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)
    if restore:
        check_sweep_resume(sweep, requested, resume)
    elif resume:
        log.info("sweep %s: nothing to resume in %s, starting it", sweep.name, sweep.storage_path)
    init_ray(address or job.get("address"))
    if sweep.scheduler.name == "asha" and not _has_dashboard():
        log.warning("sweep %s: this Ray cluster runs no dashboard, so Train's placement group cleaner cannot see "
                    "that the controller of a trial ASHA stopped is gone: the trial's CPUs and GPUs stay reserved "
                    "until the job ends. Start the cluster with its dashboard (Ray's default)", sweep.name)
    keep_credentials_out_of_trials()
    train_storage = storage.join(sweep.storage_path if storage.is_s3(sweep.storage_path) else path,
                                 sweep.name, "train")
    param_space = {key: _sampler(spec) for key, spec in sweep.space.items()}
    trainable = tune.with_parameters(run_trial, job=job, space=sweep.space, train_storage=train_storage)
    # The trial function only waits on its TorchTrainer, whose workers hold the trial's CPUs and GPUs; its own
    # request comes out of the trial's budget, or from the head's custom resource (ResourcesSection).
    check_driver_resources(sweep)
    trainable = tune.with_resources(trainable, sweep.resources.driver())
    if restore:
        log.info("resuming sweep %s from %s", sweep.name, experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space, storage_filesystem=filesystem)
    else:
        storage.write_text(storage.join(sweep.storage_path, sweep.name, SWEEP_FILE),
                           json.dumps(requested, indent=1, default=str) + "\n")
        tuner = tune.Tuner(trainable, param_space=param_space,
                           tune_config=_tune_config(sweep, job["train"]["epochs"], train_storage),
                           run_config=tune.RunConfig(name=sweep.name, storage_path=path,
                                                     storage_filesystem=filesystem))
    with signal_handlers_kept(signal.SIGINT, signal.SIGUSR1):
        grid = tuner.fit()
    return write_results(sweep, job, _trials(grid, sweep, job["train"]["epochs"], train_storage))


def check_sweep_resume(sweep: SweepConfig, requested: dict[str, Any], resume: bool) -> None:
    """Raise ``ConfigError`` unless the existing sweep of this name may be resumed: asked for (``resume``), and
    its ``sweep.json`` is ``requested`` (``SWEEP_RESUME_IGNORED`` aside). A sweep without one (made by an older
    sarl) resumes as asked, with a warning."""
    from .runs import job_differences

    where = f"sweep {sweep.name!r} in {sweep.storage_path}"
    if not resume:
        raise ConfigError(f"{where} exists already: rerun with --resume to continue it, or give another name or "
                          "storage_path. Resuming loads Tune's pickled state from that storage: resume only a sweep "
                          "whose storage you trust")
    uri = storage.join(sweep.storage_path, sweep.name, SWEEP_FILE)
    if not storage.exists(uri):
        log.warning("%s has no %s to check it against (a sweep from an older sarl): resuming it as asked",
                    where, SWEEP_FILE)
        return
    stored = json.loads(storage.read_text(uri))
    differences = [*job_differences(stored.get("sweep", {}), requested["sweep"], SWEEP_RESUME_IGNORED),
                   *(f"job.{d}" for d in job_differences(stored.get("job", {}), requested["job"], ()))]
    if differences:
        listed = "\n".join(f"  - {d}" for d in differences)
        raise ConfigError(f"{where} was started as another sweep; not resumed. What differs (stored -> "
                          f"requested):\n{listed}\nrerun it as it was, or give another name or storage_path")


def keep_credentials_out_of_trials() -> None:
    """Stop Tune from copying the driver's AWS keys into each trial actor's ``runtime_env``.

    Tune 2.60 copies ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and the session token from the driver's
    environment into the ``env_vars`` of every trial actor (``ray/tune/execution/class_cache.py``). Ray then writes
    them in plain text to the cluster's ``runtime_env_agent.log``, shows them in the dashboard's actor table, and a
    session token frozen there expires during a long sweep. Trial actors are cluster workers like any other: they
    find credentials on their node (environment, profile, instance or pod identity), as the Train workers do.
    """
    from ray.tune.execution import class_cache  # a module global Tune reads each time it makes a trial actor

    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if propagated is not None:
        class_cache.ENV_VARS_TO_PROPAGATE = frozenset(propagated) - CREDENTIAL_VARS


def check_driver_resources(sweep: SweepConfig) -> None:
    """Refuse, before any trial, custom driver resources no node of the cluster has (the trials would wait
    forever)."""
    import ray

    available = ray.cluster_resources()
    missing = sorted(k for k, v in sweep.resources.driver_resources.items() if v > 0 and k not in available)
    if missing:
        raise ConfigError(f"resources.driver_resources asks for {', '.join(missing)}, which no node of the cluster "
                          f"has (start the head with ray start --head --resources='{{\"{missing[0]}\": 1}}', or "
                          f"set resources.driver_resources={{}} and resources.driver_cpus={TRIAL_DRIVER_CPUS})")


def _trials(grid: Any, sweep: SweepConfig, max_epochs: int, train_storage: str | None = None) -> list[dict[str, Any]]:
    """One record per trial: parameters, per-epoch metric, best value, and how it ended.

    The per-epoch values come from the trial's Train run (``<train_storage>/<trial id>/history.jsonl``) when it
    has one, else from what Tune recorded. They differ after an interrupted sweep: Train can commit an epoch whose
    report never reached Tune (the trial driver was stopped in between), and the resumed trial goes on from the
    next epoch, so Tune's table lacks that epoch while Train's history has it. And a trial ASHA stopped at a rung
    can hold more epochs than the rung: ``TuneReportCallback`` puts each report on a queue Train does not wait on,
    so Train goes on with the next epoch while Tune decides (on a busy machine, to the last epoch); the record
    keeps what was trained (``epochs``) and, from Tune's table, the last epoch Tune took before it stopped the
    trial (``stopped_at``, None for a trial that ran to the end), which decides ``status``.
    """
    from .runs import Run

    trials = []
    for result in grid:
        tune_history = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or (
            tune_history["trial_id"].iloc[-1] if tune_history is not None and "trial_id" in tune_history else None)
        rows = Run(train_storage, trial_id).history() if train_storage and trial_id else []
        if rows:
            series = {key: [row[key] for row in rows if key in row] for key in (sweep.metric, "cache_hits",
                                                                                 "cache_misses")}
        else:
            series = {key: tune_history[key].tolist() if tune_history is not None and key in tune_history else []
                      for key in (sweep.metric, "cache_hits", "cache_misses")}
        curve = series[sweep.metric]
        params = result.config or {}  # None for a trial that failed before it reported (its actor never ran)
        active = {k: v for k, v in params.items() if _active(sweep.space[k], params)}
        best = (max(curve) if sweep.mode == "max" else min(curve)) if curve else None
        seen = (int(tune_history["epoch"].max()) if tune_history is not None and "epoch" in tune_history
                and len(tune_history) else len(curve))  # the last epoch Tune took
        last = min(seen, len(curve))
        stopped_at = last if last < max_epochs else None
        status = "error" if result.error else "stopped early" if stopped_at is not None else "completed"
        trials.append({"trial_id": trial_id or Path(result.path or "?").name, "status": status,
                       "epochs": len(curve), "stopped_at": stopped_at, "best": best, "curve": curve, "params": active,
                       "cache_hits": series["cache_hits"], "cache_misses": series["cache_misses"],
                       "error": str(result.error) if result.error else None})
    key = (lambda t: -t["best"]) if sweep.mode == "max" else (lambda t: t["best"])
    return sorted([t for t in trials if t["best"] is not None], key=key) + [t for t in trials if t["best"] is None]


def write_results(sweep: SweepConfig, job: dict[str, Any], trials: list[dict[str, Any]]) -> dict[str, Any]:
    """``trials.csv`` / ``trials.md`` (sorted, best first), ``best_job.yaml`` and the per-trial curve PNG."""
    import csv

    from ..plots import trial_curves

    out = Path(sweep.output_dir or (Path(sweep.storage_path) / sweep.name / "results"
                                    if not storage.is_s3(sweep.storage_path) else Path("runs/tune") / sweep.name))
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for t in trials for k in t["params"]})
    header = ["rank", "trial", "status", "stopped at", "epochs trained", f"best {sweep.metric}", *keys]
    rows = [[i + 1, t["trial_id"], t["status"], t["stopped_at"] or "-", t["epochs"],
             f"{t['best']:.2f}" if t["best"] is not None else "-",
             *[_fmt(t["params"].get(k, "-")) for k in keys]] for i, t in enumerate(trials)]
    with open(out / "trials.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    (out / "trials.md").write_text("\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n")
    (out / "trials.json").write_text(json.dumps(trials, indent=2, default=str))
    best = trials[0] if trials and trials[0]["best"] is not None else None
    best_job = None
    if best is not None:
        best_job = to_dict(trial_job(job, sweep.space, best["params"]))
        best_job["name"] = f"{sweep.name}-best"
        best_job["run"]["name"] = None
        header_text = (f"# Best trial of sweep {sweep.name}: {sweep.metric} {best['best']:.2f} after "
                       f"{best['epochs']} epochs.\n# Run it: sarl train --config {out / 'best_job.yaml'}\n")
        (out / "best_job.yaml").write_text(header_text + yaml.safe_dump(best_job, sort_keys=False))
    trial_curves(out / "val_map_per_trial.png", trials, sweep.metric, job["train"]["epochs"],
                 title=f"Sweep {sweep.name}: {sweep.metric} per trial")
    if storage.is_s3(sweep.storage_path):  # beside the sweep, too
        storage.upload_dir(out, storage.join(sweep.storage_path, sweep.name, "results"))
    return {"trials": trials, "best": best, "best_job": best_job, "output_dir": str(out)}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


__all__ = ["SweepConfig", "check_space", "load_sweep", "run_sweep", "run_trial", "trial_job", "write_results"]
