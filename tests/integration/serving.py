"""What the Serve tests share: one HTTP port for the session's Serve, deploying an app on the tiny checkpoint,
images, a client that keeps sending, and the scores the checkpoint gives in this process."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import requests
import torch
from PIL import Image

from sarl.model import Category, Vocabulary
from sarl.model.checkpoint import load_checkpoint
from sarl.model.data.transforms import build_transforms
from sarl.platform.serve import ServeConfig, deploy
from sarl.platform.serve.io import decode_image
from sarl.platform.vocab_store import VocabStore

REPO = Path(__file__).resolve().parents[2]
CARDS = ["ace", "king", "queen", "jack", "ten", "nine"]
POLL_S = 0.5
MAX_BODY = 1_000_000  # the session's apps: small limits, so that refusing what is over them is quick to test
MAX_PIXELS = 40_000_000


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
    checkpoint: Path  # the checkpoint directory (or alias file) the app was deployed with
    name: str = ""


REQUEST_TIMEOUT_S = 10  # the session's Serve proxy answers 408 to a request still waiting after this
USER_CONFIG = {"max_batch_size": 8, "batch_wait_timeout_s": 0.005, "poll_interval_s": POLL_S,
               "max_retry_interval_s": 2.0}


def first_vocabulary() -> Vocabulary:
    return Vocabulary([Category(n, threshold=0.5) for n in CARDS], version="1")


LABEL_STUDIO_BUCKET = "sarl-label-studio-images"  # the bucket whose s3:// task images the session's apps may read


def label_studio_args() -> dict:
    """The ``label_studio`` Serve args of the session's apps, as an operator sets them: the session's Label Studio
    server (its port is chosen when collection starts it, before any app is deployed; no server, no URL) and
    :data:`LABEL_STUDIO_BUCKET`. Set once when the app deploys: no redeploy for the Label Studio tests."""
    import label_studio_server

    return {"url": label_studio_server.session_url(), "allowed_buckets": [LABEL_STUDIO_BUCKET]}


def deploy_app(name: str, checkpoint: Path | str, store_uri: str, replicas: int = 2, **user_config) -> None:
    """Deploy (or redeploy: ``serve.run`` replaces the replicas, rolling) app ``name`` at ``/<name>``."""
    options = {"num_replicas": replicas, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.5},
               "max_ongoing_requests": 16, "user_config": {**USER_CONFIG, **user_config}}
    http = {"host": "127.0.0.1", "port": PORT, "request_timeout_s": REQUEST_TIMEOUT_S}
    deploy({"checkpoint": str(checkpoint), "vocab_store": store_uri, "max_body_bytes": MAX_BODY,
            "max_image_pixels": MAX_PIXELS, "label_studio": label_studio_args()},
           ServeConfig(http, {}, options, name=name, route_prefix=f"/{name}"))


def start_app(name: str, checkpoint: Path | str, store_uri: str, replicas: int = 2, push: bool = True,
              **user_config) -> App:
    store = VocabStore(store_uri)
    if push:
        store.push(first_vocabulary())
    deploy_app(name, checkpoint, store_uri, replicas, **user_config)
    app = App(f"{URL}/{name}", store, Path(checkpoint), name)
    wait_for(lambda: requests.get(f"{app.url}/readyz", timeout=5).status_code == 200, 60)
    return app


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
    """What the checkpoint gives for ``data`` in this process, decoded as a replica decodes it."""
    model = load_checkpoint(checkpoint).eval()
    size = model.config.image_size
    transform = build_transforms(size, model.config.mean, model.config.std)
    with torch.no_grad():
        return model(transform(decode_image(data, 10**8, size))[None]).sigmoid()[0]


def replica_logs(app_name: str) -> str:
    """The text of every Serve replica log of app ``app_name`` in this session's cluster."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob(f"replica_{app_name}_*.log")))


def vocabulary_of_each_replica(url: str, replicas: int = 2, timeout: float = 20) -> dict[str, dict]:
    seen: dict[str, dict] = {}

    def all_seen() -> bool:
        body = requests.get(f"{url}/v1/vocabulary", timeout=5).json()
        seen[body["replica"]] = body
        return len(seen) >= replicas

    wait_for(all_seen, timeout)
    return seen


class Record(NamedTuple):
    """One request of a :class:`Client`: monotonic send and receive times, and what came back."""

    sent: float
    received: float
    status: int | str  # the HTTP status, or the client-side exception (repr) when no response came
    version: str | None
    replica: str | None
    model: str | None  # the model id the response names
    scores: dict | None
    seed: int  # which image: png(seed=seed)


class Client:
    """Threads sending predictions continuously (thread i sends ``png(seed=i)``); records a :class:`Record` each."""

    def __init__(self, url: str, threads: int = 3, timeout: float = 30) -> None:
        self.url, self.records, self.stop, self.timeout = url, [], threading.Event(), timeout
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, seed: int) -> None:
        data = png(seed=seed)
        session = requests.Session()
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                r = session.post(f"{self.url}/v1/predict", data=data, headers={"Content-Type": "image/png"},
                                 params={"threshold": 0.0}, timeout=self.timeout)
                body = r.json() if r.status_code == 200 else {}
                record = Record(sent, time.monotonic(), r.status_code, body.get("vocabulary_version"),
                                body.get("replica"), (body.get("model") or {}).get("id"), body.get("scores"), seed)
            except requests.RequestException as e:
                record = Record(sent, time.monotonic(), repr(e), None, None, None, None, seed)
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

    def snapshot(self) -> list[Record]:
        with self.lock:
            return list(self.records)

    def first_time_each_replica_served(self, version: str) -> dict[str, float]:
        first: dict[str, float] = {}
        for r in sorted(self.snapshot(), key=lambda r: r.received):
            if r.version == version and r.replica not in first:
                first[r.replica] = r.received
        return first


def second_vocabulary() -> Vocabulary:
    """An alias, a threshold change, a disabled category and a new zero-shot category."""
    cats = [Category(n, threshold=0.5) for n in CARDS]
    cats[0] = Category("ace", aliases=["as", "one"], threshold=0.2)
    cats[5] = Category("nine", enabled=False)
    return Vocabulary([*cats, Category("joker", prompt="a photo of a {name} playing card.")], version="2")


