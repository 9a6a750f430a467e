"""Ray Serve: real HTTP to two replicas, vocabulary pushes served while a client keeps sending, bad input refused.

One app per store kind (a local directory, a bucket on moto's S3 server), each with 2 replicas polling their
store every 0.5 s. The tiny model has random weights: these tests check serving, not accuracy, and compare every
served score with the same checkpoint run in this process.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from sarl.model import Category, Vocabulary, create_model
from sarl.model.checkpoint import load_checkpoint, save_checkpoint
from sarl.model.data.transforms import build_transforms
from sarl.platform import storage
from sarl.platform.serve import ServeConfig, deploy, read_serve_config
from sarl.platform.serve_io import decode_image
from sarl.platform.vocab_store import VocabStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CARDS = ["ace", "king", "queen", "jack", "ten", "nine"]
POLL_S = 0.5
MAX_BODY = 1_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Not 8000: another Serve (a benchmark, a user's app) may hold it. Serve starts once per cluster with this port.
PORT = free_port()
URL = f"http://127.0.0.1:{PORT}"


@dataclass
class App:
    url: str
    store: VocabStore
    checkpoint: Path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vocabulary = Vocabulary([Category(n, aliases=["K"] if n == "king" else []) for n in CARDS], version="trained")
    model = create_model("tiny", vocabulary)
    return save_checkpoint(model, tmp_path_factory.mktemp("serve") / "checkpoint")


def first_vocabulary() -> Vocabulary:
    return Vocabulary([Category(n, threshold=0.5) for n in CARDS], version="1")


def start_app(name: str, checkpoint: Path, store_uri: str) -> App:
    store = VocabStore(store_uri)
    store.push(first_vocabulary())
    options = {"num_replicas": 2, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.5},
               "max_ongoing_requests": 16,
               "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005, "poll_interval_s": POLL_S}}
    deploy({"checkpoint": str(checkpoint), "vocab_store": store_uri, "max_body_bytes": MAX_BODY},
           ServeConfig({"host": "127.0.0.1", "port": PORT}, {}, options, name=name, route_prefix=f"/{name}"))
    app = App(f"{URL}/{name}", store, checkpoint)
    wait_for(lambda: requests.get(f"{app.url}/readyz", timeout=5).status_code == 200, 60)
    return app


@pytest.fixture(scope="module")
def local_app(ray_cluster, checkpoint, tmp_path_factory):
    from ray import serve

    yield start_app("local", checkpoint, str(tmp_path_factory.mktemp("store")))
    serve.delete("local")


@pytest.fixture(scope="module")
def s3_app(ray_cluster, checkpoint, s3_server):
    import boto3
    from ray import serve

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="sarl-serve-test")
    yield start_app("s3", checkpoint, "s3://sarl-serve-test/vocab")
    serve.delete("s3")


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout} s")


def png(size: tuple[int, int] = (80, 60), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (with a valid CRC) but which holds almost no data."""
    data = bytearray(png((4, 4)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def post_image(url: str, data: bytes, **params) -> requests.Response:
    return requests.post(f"{url}/v1/predict", data=data, params=params, headers={"Content-Type": "image/png"},
                         timeout=30)


def expected_scores(checkpoint: Path, data: bytes) -> torch.Tensor:
    model = load_checkpoint(checkpoint).eval()
    transform = build_transforms(model.config.image_size, model.config.mean, model.config.std)
    with torch.no_grad():
        return model(transform(decode_image(data, 10**8))[None]).sigmoid()[0]


def vocabulary_of_each_replica(url: str, replicas: int = 2, timeout: float = 20) -> dict[str, dict]:
    seen: dict[str, dict] = {}

    def all_seen() -> bool:
        body = requests.get(f"{url}/v1/vocabulary", timeout=5).json()
        seen[body["replica"]] = body
        return len(seen) >= replicas

    wait_for(all_seen, timeout)
    return seen


# ------------------------------------------------------------------------------------------------- predictions
def test_generated_image_scores_match_the_checkpoint(local_app):
    data = png()
    body = post_image(local_app.url, data, threshold=0.0).json()
    assert body["vocabulary_version"] == "1"
    expected = expected_scores(local_app.checkpoint, data)
    assert set(body["scores"]) == set(CARDS)
    for i, name in enumerate(CARDS):
        assert body["scores"][name] == pytest.approx(float(expected[i]), abs=1e-5)
    assert [label["name"] for label in body["labels"]] == sorted(CARDS, key=lambda n: -body["scores"][n])
    assert all(label["zero_shot"] is False and label["threshold"] == 0.0 for label in body["labels"])


def test_real_photos_as_raw_bytes_multipart_and_base64_json(local_app, cards_voc):
    photos = sorted((cards_voc / "test").glob("*.JPG"))[:3]
    for photo in photos:
        data = photo.read_bytes()
        raw = requests.post(f"{local_app.url}/v1/predict", data=data, headers={"Content-Type": "image/jpeg"},
                            params={"top_k": 2}, timeout=30).json()
        form = requests.post(f"{local_app.url}/v1/predict", files={"file": (photo.name, data, "image/jpeg")},
                             params={"top_k": 2}, timeout=30).json()
        as_json = requests.post(f"{local_app.url}/v1/predict", timeout=30,
                                json={"image": base64.b64encode(data).decode(), "top_k": 2}).json()
        assert raw["scores"] == form["scores"] == as_json["scores"] and len(raw["scores"]) == 2
        expected = expected_scores(local_app.checkpoint, data)
        best = sorted(range(len(CARDS)), key=lambda i: -float(expected[i]))[:2]
        assert list(raw["scores"]) == [CARDS[i] for i in best]
        assert all(label["score"] >= 0.5 for label in raw["labels"])  # each category's own threshold


def test_health_readiness_and_vocabulary_endpoints(local_app):
    assert requests.get(f"{local_app.url}/healthz", timeout=5).json()["status"] == "ok"
    assert requests.get(f"{local_app.url}/readyz", timeout=5).json()["vocabulary_version"] == "1"
    body = requests.get(f"{local_app.url}/v1/vocabulary", timeout=5).json()
    assert body["version"] == "1" and body["last_error"] is None and body["poll_interval_s"] == POLL_S
    assert [c["name"] for c in body["categories"]] == CARDS


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case,status", [
    ("not an image", 400), ("truncated", 400), ("bad base64", 400), ("too large body", 413),
    ("huge dimensions", 413), ("text/plain", 415), ("top_k=0", 422), ("threshold=2", 422),
    ("json top_k string", 422), ("two files", 422),
])
def test_bad_requests_get_their_status_and_the_replica_keeps_serving(local_app, case, status):
    url = f"{local_app.url}/v1/predict"
    image = png()
    send = {
        "not an image": lambda: post_image(local_app.url, b"this is not an image"),
        "truncated": lambda: post_image(local_app.url, image[: len(image) // 2]),
        "bad base64": lambda: requests.post(url, json={"image": "%%%not base64%%%"}, timeout=30),
        "too large body": lambda: post_image(local_app.url, b"\0" * (MAX_BODY + 1)),
        "huge dimensions": lambda: post_image(local_app.url, png_claiming(100_000, 100_000)),
        "text/plain": lambda: requests.post(url, data=image, headers={"Content-Type": "text/plain"}, timeout=30),
        "top_k=0": lambda: post_image(local_app.url, image, top_k=0),
        "threshold=2": lambda: post_image(local_app.url, image, threshold=2),
        "json top_k string": lambda: requests.post(
            url, json={"image": base64.b64encode(image).decode(), "top_k": "all"}, timeout=30),
        "two files": lambda: requests.post(url, files={"a": ("a.png", image), "b": ("b.png", image)}, timeout=30),
    }[case]
    response = send()
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and body["error"]
    if case == "huge dimensions":
        assert "over the limit of 40000000 pixels" in body["error"]
    for _ in range(4):  # both replicas (the router spreads requests) still answer normally
        assert post_image(local_app.url, image).status_code == 200


# ------------------------------------------------------------------------------------------------- hot reload
class Client:
    """Threads sending predictions continuously; records (sent, received, status, version, replica)."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url, self.records, self.stop = url, [], threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, seed: int) -> None:
        data = png(seed=seed)
        session = requests.Session()
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                r = session.post(f"{self.url}/v1/predict", data=data, headers={"Content-Type": "image/png"},
                                 timeout=30)
                body = r.json() if r.status_code == 200 else {}
                record = (sent, time.monotonic(), r.status_code, body.get("vocabulary_version"), body.get("replica"))
            except requests.RequestException as e:
                record = (sent, time.monotonic(), repr(e), None, None)
            with self.lock:
                self.records.append(record)

    def __enter__(self) -> Client:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def first_time_each_replica_served(self, version: str) -> dict[str, float]:
        with self.lock:
            records = list(self.records)
        first: dict[str, float] = {}
        for _, received, _, v, replica in sorted(records, key=lambda r: r[1]):
            if v == version and replica not in first:
                first[replica] = received
        return first


def second_vocabulary() -> Vocabulary:
    """An alias, a threshold change, a disabled category and a new zero-shot category."""
    cats = [Category(n, threshold=0.5) for n in CARDS]
    cats[0] = Category("ace", aliases=["as", "one"], threshold=0.2)
    cats[5] = Category("nine", enabled=False)
    return Vocabulary([*cats, Category("joker", prompt="a photo of a {name} playing card.")], version="2")


def check_push_served_by_every_replica(app: App) -> None:
    with Client(app.url) as client:
        time.sleep(1.5)  # traffic on the old version first
        app.store.push(second_vocabulary())
        pushed = time.monotonic()
        wait_for(lambda: len(client.first_time_each_replica_served("2")) == 2, POLL_S + 10)
        time.sleep(1.0)  # and on the new one afterwards
    records = client.records
    assert len(records) > 20
    failed = [r for r in records if r[2] != 200]
    assert failed == [], failed[:5]
    assert {r[3] for r in records} == {"1", "2"}
    first_new = client.first_time_each_replica_served("2")
    assert len(first_new) == 2 and all(t - pushed <= POLL_S + 2 for t in first_new.values()), first_new
    # No going back: a request sent after a replica answered with the new version is answered with it.
    went_back = [r for r in records if r[4] in first_new and r[0] > first_new[r[4]] and r[3] != "2"]
    assert went_back == []

    body = post_image(app.url, png(), threshold=0.0).json()
    assert body["vocabulary_version"] == "2"
    assert "nine" not in body["scores"] and {"ace", "joker"} <= set(body["scores"])
    flags = {label["name"]: label["zero_shot"] for label in body["labels"]}
    assert flags["joker"] is True and flags["ace"] is False
    default = post_image(app.url, png()).json()  # per-category thresholds: ace's is 0.2
    assert all(label["threshold"] == (0.2 if label["name"] == "ace" else 0.5) for label in default["labels"])


def test_push_to_a_local_store_is_served_by_every_replica_without_failures(local_app):
    check_push_served_by_every_replica(local_app)


def test_push_to_an_s3_store_is_served_by_every_replica_without_failures(s3_app):
    check_push_served_by_every_replica(s3_app)


def test_invalid_vocabulary_in_the_store_keeps_the_old_one_serving(local_app):
    store = local_app.store
    serving = store.current_version()
    bad = {"version": "broken", "categories": [{"name": "ace", "threshold": 1.5}, {"name": "king", "aliases": ["ace"]}]}
    storage.write_text(storage.join(store.uri, "versions", "broken.json"), json.dumps(bad))
    storage.write_text(storage.join(store.uri, "CURRENT.json"), json.dumps({"version": "broken"}))
    try:
        time.sleep(POLL_S + 1.5)
        replicas = vocabulary_of_each_replica(local_app.url)
        for body in replicas.values():
            assert body["version"] == serving
            assert body["last_error"]["version"] == "broken"
            assert "threshold 1.5 is outside [0, 1]" in body["last_error"]["message"]
        assert post_image(local_app.url, png()).json()["vocabulary_version"] == serving
    finally:
        store.set_current(serving)


# ------------------------------------------------------------------------------------------------- config file
def test_local_serve_config_autoscaling_is_what_serve_reports(ray_cluster, checkpoint, tmp_path):
    from ray import serve

    config = read_serve_config(REPO / "serve_configs" / "local.yaml")
    store = VocabStore(tmp_path / "store")
    store.push(first_vocabulary())
    config.name, config.route_prefix = "from-config", "/from-config"
    config.http_options["port"] = PORT  # the session's proxy (the file says 8000, which may be taken here)
    try:
        deploy({**config.args, "checkpoint": str(checkpoint), "vocab_store": store.uri}, config)
        # Serve's REST API, as `serve status` reads it; the cluster's auth token as `ray get-auth-token` prints it.
        token = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token"], capture_output=True,
                               text=True, check=True).stdout.strip()
        details = requests.get(f"{ray_cluster.dashboard_url}/api/serve/applications/", timeout=10,
                               headers={"Authorization": f"Bearer {token}"} if token else {}).json()
        deployment = details["applications"]["from-config"]["deployments"]["Predictor"]["deployment_config"]
        for key, value in config.deployment["autoscaling_config"].items():
            assert deployment["autoscaling_config"][key] == value, key
        assert deployment["max_ongoing_requests"] == config.deployment["max_ongoing_requests"]
        assert deployment["user_config"] == config.deployment["user_config"]
        status = serve.status().applications["from-config"]
        assert status.status == "RUNNING"
        assert post_image(f"{URL}/from-config", png()).json()["vocabulary_version"] == "1"
    finally:
        serve.delete("from-config")
