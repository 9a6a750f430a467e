"""Real parts for integration tests, one per session: an S3 server (moto, over HTTP); Ray below.

Each part is a session fixture that starts it and a function fixture that hands a test a fresh,
isolated piece of it (a bucket, ...). Environment variables a part needs are set for the session
and restored afterwards, so that code under test finds the part the way it would in production.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import pytest
from moto.server import ThreadedMotoServer

# ---------------------------------------------------------------------------------------------- S3

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
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
            server.stop()


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

    from sarl.platform.train import init_ray

    yield RayCluster(dashboard_url=f"http://{init_ray(num_cpus=4, dashboard=True)}")
    ray.shutdown()
