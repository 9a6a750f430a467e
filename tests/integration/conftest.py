"""Real parts for integration tests, one per session: an S3 server (moto, over HTTP); Ray below.

Each part is a session fixture that starts it and a function fixture that hands a test a fresh,
isolated piece of it (a bucket, ...). Environment variables a part needs are set for the session
and restored afterwards, so that code under test finds the part the way it would in production.

Two Ray clusters exist: ``ray_cluster`` (one local node, started by the test process) and ``two_node_cluster``
(a head and a worker node that share no disk, ``two_node.py``). A process can be the driver of only one of them:
after ``ray.shutdown()`` and ``ray.init()`` to a second cluster, every actor the driver creates is cancelled
before it starts ("Actor creation cancelled", Ray 2.60; ray-project/ray#54841 is the same family), Train's
controller included. So the tests that use the two-node cluster carry the ``two_node`` mark (added here, from the
fixture) and run in a pytest process of their own: ``make test`` runs ``-m "not two_node"``, then ``-m two_node``.
A session that selects both fails the two-node tests with that explanation rather than with Ray's error.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

# ---------------------------------------------------------------------------------------------- S3

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    # moto takes any secret; a distinctive one lets tests look for it in what runs write (it must be in none).
    "AWS_SECRET_ACCESS_KEY": "SARLSECRET-moto-7d1f0c9a2b",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's standalone S3 server on 127.0.0.1 (a free port); yields its endpoint URL.

    ``AWS_ENDPOINT_URL`` and test credentials are exported for the session, so boto3, pyarrow and
    Ray workers started from this process all reach the server over real HTTP.
    """
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _moto["server"] = server
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name in ("SARL_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            env.delenv(name, raising=False)  # they would override or confuse the server's settings
        for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            env.setenv(name, value)
        try:
            yield endpoint
        finally:
            _moto["server"].stop()


_moto: dict[str, ThreadedMotoServer] = {}


class S3Outage:
    """Stops the session's S3 endpoint and starts it again on the same port. moto keeps its buckets in this
    process's memory, not in the server, so what was stored before the outage is there after it."""

    def __init__(self) -> None:
        self.host, self.port = _moto["server"].get_host_and_port()
        self.outages: list[tuple[float, float]] = []  # (stopped, started) as time.time()

    def stop(self) -> None:
        _moto["server"].stop()  # the listening socket closes: connections are refused until start()

    def start(self) -> None:
        server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        server.start()
        _moto["server"] = server

    def for_seconds(self, seconds: float) -> None:
        """An outage of ``seconds`` (or until :meth:`end`), from a thread of its own (a request handler may ask
        for it)."""
        import threading

        self._ended = threading.Event()

        def run() -> None:
            stopped = time.time()
            self.stop()
            self._ended.wait(seconds)
            self.start()
            self.outages.append((stopped, time.time()))

        threading.Thread(target=run, daemon=True).start()

    def end(self) -> None:
        """End the running outage now."""
        self._ended.set()


@pytest.fixture
def s3_outage(s3_server) -> Iterator[S3Outage]:
    outage = S3Outage()
    try:
        yield outage
    finally:
        deadline = time.monotonic() + 60
        while not _server_answers(s3_server) and time.monotonic() < deadline:
            time.sleep(0.5)  # an outage still running: the next tests need the endpoint back


def _server_answers(endpoint: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(endpoint, timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, uniquely named bucket on the session's S3 server, created through boto3 over HTTP."""
    name = f"sarl-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


# --- Ray ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayCluster:
    dashboard_url: str  # http://host:port of the dashboard, which also serves Serve's REST API


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> Iterator[RayCluster]:
    """One real local Ray cluster per test session, started the way ``sarl train`` starts one.

    It starts after the S3 server, so its processes inherit the endpoint and credentials. 4 logical CPUs on a
    2-core machine: two 1-CPU training workers plus Train's controller fit at once. With the dashboard, as users
    run it: Serve's REST API (what ``serve status`` and ``serve deploy`` talk to) is served by it.
    """
    import ray

    from sarl.platform.cluster import init_ray

    global _local_cluster_started
    if _two_node_running:
        pytest.fail("ray_cluster requested after the two-node cluster started: run the two kinds of tests in "
                    "separate pytest processes (-m 'not two_node', then -m two_node; see the module doc)")
    _local_cluster_started = True
    # this venv's commands on the cluster's PATH, as on a cluster whose image installs sarl: `ray job submit` runs
    # its entrypoint (`sarl ...`) in the environment of the processes this starts
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    import label_studio_server

    with pytest.MonkeyPatch.context() as env:
        # the token of the session's Label Studio in the nodes' environment, where an operator gives it to the
        # replicas (the apps' Label Studio backend reads it there; never in a Serve config or runtime env)
        env.setenv("LABEL_STUDIO_API_KEY", label_studio_server.TOKEN)
        yield RayCluster(dashboard_url=f"http://{init_ray(num_cpus=4, dashboard=True)}")
        ray.shutdown()


_two_node_running = False
_local_cluster_started = False


# --- Serve ----------------------------------------------------------------------------------------------------
# One app on a local store and one on an S3 store for the session (2 replicas each: the tests check that every
# replica serves a push, answers after a bad request, ...). Tests that change what they serve redeploy an app of
# their own (a canary, a rollout); tests that change the store's current version put it back.


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory) -> Path:
    """The tiny model with random weights (seed 0) on the cards vocabulary ('K' an alias of king), epoch 7."""
    import torch

    from sarl.model import Category, Vocabulary, create_model
    from sarl.model.checkpoint import save_checkpoint

    from serving import CARDS

    torch.manual_seed(0)
    vocabulary = Vocabulary([Category(n, aliases=["K"] if n == "king" else []) for n in CARDS], version="trained")
    return save_checkpoint(create_model("tiny", vocabulary), tmp_path_factory.mktemp("serve") / "checkpoint",
                           extra={"epoch": 7})


@pytest.fixture(scope="session")
def local_app(ray_cluster, serve_checkpoint, tmp_path_factory):
    from ray import serve

    from serving import start_app

    yield start_app("local", serve_checkpoint, str(tmp_path_factory.mktemp("store")))
    serve.delete("local")


@pytest.fixture(scope="session")
def s3_app(ray_cluster, serve_checkpoint, s3_server):
    from ray import serve

    from serving import start_app

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="sarl-serve-test")
    yield start_app("s3", serve_checkpoint, "s3://sarl-serve-test/vocab")
    serve.delete("s3")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(config, items):
    """Tests on the two-node cluster get the ``two_node`` mark and run last (stable order otherwise)."""
    two_node = [i for i in items if "two_node_cluster" in getattr(i, "fixturenames", ())]
    for item in two_node:
        item.add_marker(pytest.mark.two_node)
    items[:] = [i for i in items if i not in two_node] + two_node


@pytest.fixture(scope="session")
def two_node_cluster(s3_server):
    """A head (no CPUs) and a worker node (2 CPUs) in its own mount namespace, private /tmp and ~/.cache.

    Started after the S3 server, so both nodes take ``AWS_*`` from their environment; this process is their
    driver (``RAY_AUTH_MODE=disabled``, ``init_ray(address)`` as ``sarl --address`` connects). Yields the
    ``two_node.TwoNodeCluster``; the nodes are stopped by the ids of the processes started.
    """
    global _two_node_running
    import sys

    import ray

    import two_node

    if Path(sys.prefix).resolve().is_relative_to("/tmp"):  # the worker's private /tmp would hide this venv
        pytest.skip(f"the virtual environment {sys.prefix} lies under /tmp, which the worker node mounts privately")

    from sarl.platform.cluster import init_ray

    if _local_cluster_started:
        pytest.fail("this pytest process already drove the local ray_cluster, and Ray cancels every actor a "
                    "driver creates after it reconnects to a second cluster: run the two-node tests in a process "
                    "of their own (pytest -m two_node; `make test` does)")
    if ray.is_initialized():
        ray.shutdown()  # a cluster a unit test started with plain tasks
    _two_node_running = True
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        env.delenv("RAY_ADDRESS", raising=False)
        cluster = two_node.start(worker_cpus=2)
        try:
            init_ray(cluster.address)
            deadline = time.monotonic() + 60
            while sum(n["Alive"] for n in ray.nodes()) < 2 or ray.cluster_resources().get("CPU", 0) < 2:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the worker node did not join: {ray.nodes()}")
                time.sleep(0.5)
            yield cluster
        finally:
            ray.shutdown()
            two_node.stop(cluster)


# --- Label Studio ---------------------------------------------------------------------------------------------
# One real server per session (label_studio_server.py): started in the background when collection shows a test
# wants it (the hook below), waited for by the fixture.

from label_studio_server import pytest_collection_finish  # noqa: E402, F401  (the hook that starts it early)


@pytest.fixture(scope="session")
def label_studio():
    """The session's Label Studio server: yields ``(url, token, document_root)``; skips without ``.venv-ls``."""
    import label_studio_server

    reason = label_studio_server.missing_reason()
    if reason:
        pytest.skip(reason)
    try:
        yield label_studio_server.session_server().wait()
    finally:
        label_studio_server.stop_session_server()
