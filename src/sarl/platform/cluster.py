"""The cluster side of every command: connecting to Ray, the checks a job passes before any worker starts, where
a task or worker finds the job's data (its node's copy of ``s3://`` URIs; absolute local paths), and the resources
of one task.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..model.experiment import cache_disabled_reason
from . import node_cache, storage
from .job import JobConfig
from .word_vectors import check_trusted, local_word_vectors

log = logging.getLogger("sarl.train")


def preflight(job: JobConfig) -> None:
    """Checks that fail fast, before any worker starts: storage reachable and writable, data present."""
    storage.check_writable(job.run.storage_path)
    if job.data.root and not storage.is_s3(job.data.root) and not Path(job.data.root).expanduser().exists():
        raise FileNotFoundError(f"data.root {job.data.root} does not exist")
    for key, uri in data_sources(job):  # on S3: a HEAD or a one-key listing each; every node copies its own
        if storage.is_s3(uri) and not storage.exists(uri):
            raise FileNotFoundError(f"{key} {uri} does not exist")
    if isinstance(job.model.get("word_vectors"), str):
        check_trusted(job.model["word_vectors"])  # a pickle from storage: refused here, not in every worker
    if job.cache.enabled:
        reason = cache_disabled_reason(job)
        if reason:
            log.warning(reason)
        else:
            root = job.cache.root
            storage.check_writable(root if storage.is_s3(root) else Path(root).expanduser())


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool | None = None) -> str | None:
    """Connect to ``address`` (or $RAY_ADDRESS), else start a local cluster; a no-op when already connected.

    Returns the dashboard's address (host:port) when this call started or joined a cluster that has one.

    Every task and actor of the job gets ``RAY_ADDRESS`` (the job's runtime environment): Train's detached
    ``PlacementGroupCleaner`` asks the State API whether its controller still lives and removes the placement
    group of a run whose controller died (a trial ASHA stopped), and without the address, where several Ray
    instances run on one machine, it cannot find its own, so the stopped trials' resources never came back. The
    State API is served by the dashboard: ``dashboard=False`` (benchmarks, to save its CPU on small machines)
    leaves such placement groups until the job ends, and each cleaner running until the cluster stops.
    """
    import ray

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if address:
        if address != "auto":
            env["RAY_ADDRESS"] = address
        context = ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env})
        return context.dashboard_url or None
    port = _free_port()  # a local cluster's GCS port, chosen here so that its address is known before it starts
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    with _environ(RAY_GCS_SERVER_PORT=str(port)):
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True,
                           runtime_env={"env_vars": env})
    return context.dashboard_url or None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the block, then as it was."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def data_sources(job: JobConfig, model_files: bool = True) -> list[tuple[str, str]]:
    """``(job key, URI or path)`` of what the job reads besides its checkpoints: the data set, and with
    ``model_files`` the word vectors and the weights source (``model.pretrained``: a path, URI or open_clip tag)."""
    sources = [("data.root", job.data.root)]
    if model_files:
        sources += [(f"model.{key}", job.model.get(key)) for key in ("word_vectors", "pretrained")]
    return [(key, value) for key, value in sources if isinstance(value, str) and value]


def resolve_data_uris(job: JobConfig, model_files: bool = True) -> JobConfig:
    """A copy of ``job`` whose ``s3://`` data set (with ``model_files``: word vectors and weights too) are local
    paths *on the node this runs on*: its node cache (``node_cache.local_copy``), filled once per node and version
    under a file lock however many workers of the node ask at once.

    The workers call it (``train_loop_per_worker``, evaluation tasks), never the driver: the job they are sent and
    the ``job.yaml`` a checkpoint keeps name the URIs, so a checkpoint evaluates on any machine. Pickled word
    vectors from storage are refused before any download unless trusted (``word_vectors``).
    """
    job = copy.deepcopy(job)
    for key, value in data_sources(job, model_files):
        if not storage.is_s3(value):
            continue
        if key == "data.root":
            job.data.root = str(node_cache.local_copy(value))
        else:
            fetch = local_word_vectors if key == "model.word_vectors" else node_cache.local_copy  # pickles refused
            job.model[key.split(".", 1)[1]] = str(fetch(value))
    return job


def absolute_paths(job: JobConfig) -> JobConfig:
    """A copy of ``job`` whose relative local paths are absolute, resolved in this process's working directory.

    Train V2 runs every worker in a directory of its own (``<session>/artifacts/<run>``: ``RAY_CHDIR_TO_TRIAL_DIR``)
    and Tune its trial functions in theirs, so a relative ``run.storage_path`` (the default ``runs/ray``) put
    ``history.jsonl`` and the failure markers where the driver never reads them, and a relative data set, word
    vectors or cache root was looked up there. The driver resolves them once, before it ships the job. ``~`` stays
    for the node to expand (its own home), except in ``run.storage_path``, which Ray expands on the driver too.
    """
    job = copy.deepcopy(job)

    def absolute(value: str | None, must_exist: bool = False) -> str | None:
        if not value or storage.is_s3(value) or value.startswith("~") or Path(value).is_absolute():
            return value
        try:
            path = storage.local_path(value)
        except storage.StorageError:
            if must_exist:  # in a job's copy of its working directory: a name (an open_clip tag) stays a name
                return value
            raise
        return str(path) if not must_exist or path.exists() else value

    if not storage.is_s3(job.run.storage_path):
        job.run.storage_path = str(storage.local_path(job.run.storage_path))
    job.data.root = absolute(job.data.root)
    job.cache.root = absolute(job.cache.root)
    for key in ("word_vectors", "pretrained"):  # a name that is no file here (an open_clip tag) stays a name
        if isinstance(job.model.get(key), str):
            job.model[key] = absolute(job.model[key], must_exist=True)
    return job


def task_options(job: JobConfig) -> dict[str, Any]:
    """Ray resources of one evaluation task: those of one training worker of the job."""
    resources = job.scaling.worker_resources()
    return {"num_cpus": resources.pop("CPU"), "num_gpus": resources.pop("GPU", 0), "resources": resources}


def connected_or_named(address: str | None) -> bool:
    """Whether Ray is connected here or a cluster is named (``address``, ``$RAY_ADDRESS``)."""
    import ray

    return ray.is_initialized() or bool(address or os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def signal_handlers_kept(*signums: int) -> Iterator[None]:
    """The handlers of ``signums`` (default SIGINT) as they were, once the block returns or raises.

    Train V2's ``fit()`` installs a SIGINT handler (Ctrl-C aborts the run) and leaves it: its controller's handle
    then outlives the run (one ``ray::TrainController`` per fit stays alive), and a later Ctrl-C (during
    evaluation, ``sarl protocol``'s next run) is swallowed twice and then exits 0. Tune's ``fit()`` leaves its
    SIGINT and SIGUSR1 handlers the same way (a later Ctrl-C only sets the event of a finished sweep). Only the
    main thread has signal handlers (Tune's trials fit in threads: nothing to keep)."""
    signums = signums or (signal.SIGINT,)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
