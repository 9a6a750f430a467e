"""Online prediction throughput and latency, side by side in one run, and vocabulary hot reload under load.

Same model (``rn50`` with random weights at 224 px by default; ``tiny`` at 64 px for a smoke run), same PNG
images (generated, 320x240, sent as raw bytes), same CPUs (``--cpus``, default all) for every mode:

1. the raw batched forward in this process (decode + preprocess + ``BoundVocabulary.score`` on a batch of
   ``concurrency`` images): the limit; latency of an image is the latency of its batch;
2. Ray Serve over HTTP (``sarl.platform.serve.deployment.Predictor``, one replica holding all the CPUs) with dynamic
   batching (``max_batch_size`` 32, ``batch_wait_timeout_s`` 0.01);
3. the same deployment reconfigured to ``max_batch_size`` 1 (no batching);
4. a plain FastAPI app in one uvicorn process, one forward per request in the threadpool (this file, run as
   ``python bench/serve.py --plain-server PORT CHECKPOINT``);
5. and 6. the deployment's middleware, side by side: (4) with the exception handlers of the deployment and its
   middleware as it was, Starlette's ``BaseHTTPMiddleware`` (5), or as it is, plain ASGI (``ErrorsAndMetrics``,
   6), each on ``/v1/predict`` and on ``/v1/echo`` (the body read and checked, no image: the cost per request of
   the HTTP path alone, where the middleware's share shows); and the two apps called in this process as ASGI, no
   sockets: CPU microseconds per request of the app and its middleware alone, a figure other jobs on the machine
   hardly move.

HTTP modes are driven by a closed-loop client (asyncio + httpx, ``concurrency`` workers each sending its next
request when the previous one is answered) for a warm-up and then a measured window, at concurrency 1, 8 and
32: images/s, p50 and p99 latency, failed requests. Ratios are printed to (1) and (4), with the targets
(2) >= 0.8x (1) at concurrency 32 and (2) >= 1.5x (4) at concurrency 32, and (6) to (5).

Hot reload: with (2) deployed and a client at concurrency 8, 20 new vocabulary versions are pushed to the store
one after another (thresholds change, every other one adds a zero-shot category); each waits until a response
carries it. Swap latency is push to first response with that version (it includes the replicas' poll interval,
0.5 s here); failed requests must be 0, and no request sent after a version was served may get an older one.

    python bench/serve.py [--quick] [--duration S] [--concurrency 1 8 32] [--model rn50|tiny]
    python bench/serve.py --model tiny --quick          # smoke run, about 3 minutes; the full run about 9
    python bench/serve.py --model tiny --quick --skip raw plain serve serve1 reload   # (5) and (6) only, 1 minute
    python bench/serve.py --device cuda --cpus 16       # on a GPU machine: the targets are judged there
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from fastapi import FastAPI, Request
from PIL import Image, ImageDraw

from sarl.model import Category, Vocabulary, create_model
from sarl.model.checkpoint import load_checkpoint, save_checkpoint
from sarl.model.data.transforms import build_transforms
from sarl.model.serving import bind_vocabulary
from sarl.platform.serve.io import decode_image, parse_predict_request
from sarl.platform.serve.scoring import DEFAULT_MAX_PIXELS

CATEGORIES = [f"category {i}" for i in range(20)]  # VOC-sized vocabulary, as bench/model_forward.py
MODELS = {"tiny": {}, "rn50": {"pretrained": None, "semantic_source": "clip"}}  # random weights
APP = "bench"
MODES = {
    "raw": "(1) raw batched forward",
    "serve": "(2) Serve HTTP, batching",
    "serve1": "(3) Serve HTTP, no batching",
    "plain": "(4) FastAPI+uvicorn, 1 fwd/req",
    "base": "(5) (4)+BaseHTTPMiddleware",
    "asgi": "(6) (4)+ASGI middleware",
    "base-echo": "(5) /v1/echo, no image",
    "asgi-echo": "(6) /v1/echo, no image",
}
MIDDLEWARE_MODES = {"base": ("base", "/v1/predict"), "asgi": ("asgi", "/v1/predict"),
                    "base-echo": ("base", "/v1/echo"), "asgi-echo": ("asgi", "/v1/echo")}  # mode: (kind, path)
TARGETS = (("serve", "raw", 0.8), ("serve", "plain", 1.5))  # (2) >= 0.8x (1), (2) >= 1.5x (4), at concurrency 32
_T0 = time.perf_counter()
DEVICE = torch.device("cpu")  # --device


def _terminated(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)  # SIGTERM: shut Serve, Ray and the plain server down, remove the temp files


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds the report only."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ inputs
def make_images(n: int = 8, size: tuple[int, int] = (320, 240), seed: int = 0) -> list[bytes]:
    """PNG bytes of random shapes on a gradient with a little noise (about the size of a photo's PNG)."""
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    out = []
    for _ in range(n):
        gradient = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :, None].repeat(size[1], 0).repeat(3, 2)
        image = Image.fromarray(gradient)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.randrange(size[0] - 40), rng.randrange(size[1] - 40)
            box = (x0, y0, x0 + rng.randrange(20, 120), y0 + rng.randrange(20, 100))
            color = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
        pixels = np.asarray(image, dtype=np.int16) + noise.integers(-6, 7, (size[1], size[0], 3))  # sensor noise
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def vocabulary(version: int) -> Vocabulary:
    """Version 1: the trained categories at threshold 0.5. Later ones: other thresholds, every other one a
    zero-shot category more (its CLIP prompt features are built by the replica when it loads the version)."""
    threshold = 0.5 if version == 1 else round(0.3 + 0.02 * (version % 20), 2)
    categories = [Category(name, threshold=threshold) for name in CATEGORIES]
    if version > 1 and version % 2:
        categories.append(Category(f"extra {version}", prompt="a photo of a {name}."))
    return Vocabulary(categories, version=str(version))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OtherLoad:
    """CPU used by processes outside this run (this process and its descendants: Ray, the plain server) while a
    cell is measured, in cores, from /proc (Linux): another job on the machine invalidates the figures."""

    def __init__(self) -> None:
        self.cells: dict[str, float] = {}
        self.retried: list[str] = []  # cells measured again because another job used the CPUs
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
        parents, ticks = {}, {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parents[int(proc.name)], ticks[int(proc.name)] = int(fields[1]), int(fields[11]) + int(fields[12])
        mine, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            children = [pid for pid, ppid in parents.items() if ppid in frontier and pid not in mine]
            mine.update(children)
            frontier = children
        busy = (user + nice + system + irq + softirq) / tick
        return time.perf_counter(), busy, sum(ticks[p] for p in mine if p in ticks) / tick

    def start(self) -> None:
        try:
            self._start = self._sample()
        except (OSError, ValueError):
            self._start = None

    def stop(self, label: str) -> None:
        if self._start is None:
            return
        try:
            end = self._sample()
        except (OSError, ValueError):
            return
        (t0, busy0, mine0), (t1, busy1, mine1) = self._start, end
        self.cells[label] = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / (t1 - t0)

    def worst(self) -> tuple[str, float] | None:
        return max(self.cells.items(), key=lambda kv: kv[1]) if self.cells else None

    def wait_quiet(self, timeout: float, window: float = 5.0, windows: int = 3) -> bool:
        """Wait until other processes have used under ``QUIET_CPUS`` for ``windows`` windows in a row."""
        deadline, quiet = time.monotonic() + timeout, 0
        while quiet < windows and time.monotonic() < deadline:
            self.start()
            time.sleep(window)
            self.stop("quiet")
            quiet = quiet + 1 if self.cells.pop("quiet", 0.0) < QUIET_CPUS else 0
        return quiet >= windows


OTHER_LOAD = OtherLoad()
QUIET_CPUS = 0.1  # a cell during which other processes used more is measured again once they are quiet


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Cell:
    """One mode at one concurrency."""

    rate: float  # images/s
    p50_ms: float
    p99_ms: float
    samples: int  # latencies behind p50/p99 (requests, or batches for the raw forward)
    failed: int = 0


@dataclass
class Record:
    worker: int
    sent: float
    done: float
    ok: bool
    version: str | None
    error: str | None = None


@dataclass
class Load:
    """Shared state of a closed-loop HTTP client run."""

    records: list[Record] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    first_seen: dict[str, float] = field(default_factory=dict)  # version -> first time a response carried it


# ------------------------------------------------------------------------------------------------ (1) raw
def raw_cell(model, bound, transform, images: list[bytes], batch: int, warmup: float, duration: float) -> Cell:
    """Decode + preprocess ``batch`` images and score them as one batch, back to back, in this process."""
    k, size = 0, model.config.image_size

    def step() -> float:
        nonlocal k
        start = time.perf_counter()
        x = [transform(decode_image(images[(k + j) % len(images)], DEFAULT_MAX_PIXELS, size)) for j in range(batch)]
        bound.score_list(model, x, DEVICE)  # what a replica runs: stack, copy, forward (bf16 on CUDA), copy back
        k += batch
        return time.perf_counter() - start

    start = time.perf_counter()
    while time.perf_counter() - start < warmup or k == 0:
        step()
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration or len(latencies) < 2:
        latencies.append(step())
    return Cell(batch * len(latencies) / sum(latencies), 1000 * percentile(latencies, 50),
                1000 * percentile(latencies, 99), len(latencies))


# ------------------------------------------------------------------------------------------------ HTTP client
async def _worker(i: int, client: httpx.AsyncClient, url: str, images: list[bytes], load: Load) -> None:
    k = i
    while not load.stop.is_set():
        data = images[k % len(images)]
        k += 1
        sent = time.perf_counter()
        try:
            r = await client.post(url, content=data, headers={"Content-Type": "image/png"})
            ok = r.status_code == 200
            version = r.json().get("vocabulary_version") if ok else None
            error = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
        except (httpx.HTTPError, ValueError) as e:
            ok, version, error = False, None, repr(e)
        done = time.perf_counter()
        if version is not None:
            load.first_seen.setdefault(version, done)
        load.records.append(Record(i, sent, done, ok, version, error))


async def drive(base_url: str, images: list[bytes], concurrency: int,
                controller: Callable[[Load], Awaitable[None]], path: str = "/v1/predict") -> Load:
    """``concurrency`` closed-loop workers POSTing images to ``base_url`` + ``path`` until ``controller`` returns;
    in-flight requests are then answered (not cancelled), so the next run starts on an idle server."""
    load = Load()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0), trust_env=False) as client:
        url = f"{base_url}{path}"
        workers = [asyncio.create_task(_worker(i, client, url, images, load)) for i in range(concurrency)]
        try:
            await controller(load)
        finally:
            load.stop.set()
            await asyncio.gather(*workers)
    return load


def summarize(load: Load, start: float, end: float, concurrency: int) -> Cell:
    """Requests answered within [start, end]. Throughput is summed over workers, each worker's rate being its
    completions per second between its first and last answer in the window: exact for batched answers, which
    arrive in bursts a plain count over the window would cut at random."""
    window = [r for r in load.records if start <= r.done <= end and r.ok]
    rate = 0.0
    for w in range(concurrency):
        done = sorted(r.done for r in window if r.worker == w)
        rate += (len(done) - 1) / (done[-1] - done[0]) if len(done) >= 2 else len(done) / (end - start)
    latencies = [r.done - r.sent for r in window]
    failed = sum(not r.ok for r in load.records)
    return Cell(rate, 1000 * percentile(latencies, 50), 1000 * percentile(latencies, 99), len(latencies), failed)


def http_cell(base_url: str, images: list[bytes], concurrency: int, warmup: float, duration: float,
              path: str = "/v1/predict") -> Cell:
    window: dict[str, float] = {}

    async def timed(_: Load) -> None:
        await asyncio.sleep(warmup)
        window["start"] = time.perf_counter()
        await asyncio.sleep(duration)
        window["end"] = time.perf_counter()

    load = asyncio.run(drive(base_url, images, concurrency, timed, path))
    cell = summarize(load, window["start"], window["end"], concurrency)
    errors = [r.error for r in load.records if not r.ok]
    if errors:
        log(f"  {len(errors)} failed requests, first: {errors[0]}")
    return cell


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            with opener.open(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready within {timeout} s")


# ------------------------------------------------------------------------------------------------ (4) plain
def base_http_middleware(app: FastAPI) -> None:
    """(5): the deployment's middleware as it was before ``ErrorsAndMetrics``, the same work through Starlette's
    ``BaseHTTPMiddleware``, for the figures side by side."""
    from sarl.platform.serve import deployment as serving

    @app.middleware("http")
    async def errors_and_metrics(request: Request, call_next: Callable) -> object:
        request_id = serving._request_id(request.scope)
        request.state.request_id = request_id
        reason = None
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001
            status, message, reason = serving.internal_error(exc)
            response = serving.error_response(status, message, request_id, reason)
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None and request.url.path.endswith("/v1/predict"):
            metrics.request(response.status_code, reason or getattr(request.state, "reason", None)
                            or ("ok" if response.status_code < 400 else serving.REASONS.get(response.status_code)))
        return response


def with_middleware(app: FastAPI, kind: str, model_id: str) -> None:
    """(5) ``base`` or (6) ``asgi``: the deployment's middleware, exception handlers and metrics on ``app``."""
    from fastapi.exceptions import RequestValidationError

    from sarl.platform.serve import deployment as serving
    from sarl.platform.serve.io import RequestError
    from sarl.platform.serve.metrics import ServeMetrics

    if kind == "base":
        base_http_middleware(app)
    else:
        app.add_middleware(serving.ErrorsAndMetrics)
    app.exception_handler(RequestError)(serving._request_error)
    app.exception_handler(RequestValidationError)(serving._validation_error)
    app.state.metrics = ServeMetrics(model_id, "sha256:bench")  # Ray's metrics API: no-ops without a Ray worker

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        image = (await parse_predict_request(request, 50 * 1024 * 1024)).image
        return {"bytes": len(image), "request_id": request.state.request_id}


def middleware_cost(kind: str, requests: int = 3000, concurrency: int = 8) -> float:
    """CPU microseconds per ``POST /v1/echo`` of an app with middleware ``kind``, ``concurrency`` at a time, called
    in this process as ASGI (no sockets, no HTTP parsing: the app and its middleware alone)."""
    app = FastAPI()
    with_middleware(app, kind, "bench")
    body = make_images(1)[0]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/echo", "raw_path": b"/v1/echo", "root_path": "", "query_string": b"",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
             "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())]}

    async def one() -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            assert message["type"] != "http.response.start" or message["status"] == 200, message

        await app(dict(scope), receive, send)

    async def run(n: int) -> None:
        for _ in range(n // concurrency):
            await asyncio.gather(*(one() for _ in range(concurrency)))

    asyncio.run(run(requests // 10))  # warm-up
    start = time.process_time()
    asyncio.run(run(requests))
    return 1e6 * (time.process_time() - start) / requests


def plain_server(port: int, checkpoint: str, threads: int, device: str, middleware: str = "none") -> None:
    """A single-process FastAPI app: one forward per request, the forward in the threadpool (``--plain-server``),
    with the deployment's middleware ``base`` (5) or ``asgi`` (6)."""
    import uvicorn
    from fastapi.concurrency import run_in_threadpool

    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint, map_location=device).eval()
    bound = bind_vocabulary(model, model.vocabulary)
    cfg = model.config
    transform = build_transforms(cfg.image_size, cfg.mean, cfg.std, train=False)
    categories = bound.vocabulary.categories

    def predict_one(data: bytes) -> dict:
        image = transform(decode_image(data, DEFAULT_MAX_PIXELS, cfg.image_size))
        probs = bound.score_list(model, [image], torch.device(device))[0]
        rows = sorted(zip(probs, categories), key=lambda r: -r[0])
        return {"vocabulary_version": bound.version, "scores": {c.name: round(p, 6) for p, c in rows},
                "labels": [{"name": c.name, "score": round(p, 6), "threshold": c.threshold}
                           for p, c in rows if p >= c.threshold]}

    predict_one(make_images(1)[0])  # warm-up, as the Serve replica does
    app = FastAPI()
    if middleware != "none":
        with_middleware(app, middleware, "bench")

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict:
        return await run_in_threadpool(predict_one, await request.body())

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_plain(checkpoint: Path, threads: int, middleware: str = "none") -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen([sys.executable, __file__, "--plain-server", str(port), str(checkpoint),
                                "--cpus", str(threads), "--device", DEVICE.type, "--middleware", middleware],
                               env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", 180, process)
    except BaseException:
        stop_process(process)
        raise
    return process, url


def stop_servers(servers: list[subprocess.Popen]) -> None:
    while servers:
        stop_process(servers.pop())


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------------------------ (2), (3) Serve
def deploy_serve(checkpoint: Path, store: Path, port: int, cpus: int, user_config: dict) -> str:
    from sarl.platform.serve import ServeConfig, deploy

    options = {"num_replicas": 1, "autoscaling_config": None, "max_ongoing_requests": 64,
               "ray_actor_options": {"num_cpus": cpus, "num_gpus": 1 if DEVICE.type == "cuda" else 0,
                                     "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cpus)}}},
               "user_config": user_config}
    url = deploy({"checkpoint": str(checkpoint), "vocab_store": str(store), "device": DEVICE.type},
                 ServeConfig({"host": "127.0.0.1", "port": port}, {}, options, name=APP, route_prefix="/"))
    wait_http(f"{url}/readyz", 180)
    return url


def replica_threads() -> str:
    """OMP_NUM_THREADS of the Serve replica's process, read from /proc (Linux); what torch sizes its pool by."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"ServeReplica:{APP}:Predictor" not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
            found.append(f"pid {proc.name} OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}")
        except OSError:
            continue
    return ", ".join(found) or "replica process not found"


def hot_reload(base_url: str, store, images: list[bytes], swaps: int, concurrency: int, poll: float) -> dict:
    """Push ``swaps`` versions one after another under load; each waits for a response carrying it."""
    rng = random.Random(1)
    latencies: dict[str, float] = {}
    missed: list[str] = []
    window: dict[str, float] = {}

    async def pusher(load: Load) -> None:
        await asyncio.sleep(2.0)  # traffic on the old version first
        window["start"] = time.perf_counter()
        first = int(store.current_version()) + 1  # new versions on a second attempt too
        for version in range(first, first + swaps):
            name = str(version)
            await asyncio.sleep(rng.uniform(0, poll))  # a push at any phase of the replica's poll, not right after one
            pushed = time.perf_counter()
            store.push(vocabulary(version))
            while name not in load.first_seen and time.perf_counter() - pushed < 60:
                await asyncio.sleep(0.005)
            if name in load.first_seen:
                latencies[name] = load.first_seen[name] - pushed
            else:
                missed.append(name)
        window["end"] = time.perf_counter()
        await asyncio.sleep(1.0)  # and traffic on the last version afterwards

    load = asyncio.run(drive(base_url, images, concurrency, pusher))
    # Going back: a request sent after a newer version had been served, answered with an older one.
    newest, went_back = 0, 0
    answered = sorted((r.done, int(r.version)) for r in load.records if r.ok)
    i = 0
    for r in sorted((r for r in load.records if r.ok), key=lambda r: r.sent):
        while i < len(answered) and answered[i][0] <= r.sent:
            newest = max(newest, answered[i][1])
            i += 1
        went_back += int(r.version) < newest
    failed = [r for r in load.records if not r.ok]
    if failed:
        log(f"  {len(failed)} failed requests during the swaps, first: {failed[0].error}")
    during = [r for r in load.records if window["start"] <= r.done <= window["end"] and r.ok]
    values = list(latencies.values())
    return {"swaps": swaps, "seen": len(latencies), "missed": missed, "p50": 1000 * percentile(values, 50),
            "p99": 1000 * percentile(values, 99), "max": 1000 * max(values, default=math.nan),
            "requests": len(load.records), "failed": len(failed), "went_back": went_back,
            "rate": len(during) / (window["end"] - window["start"]), "seconds": window["end"] - window["start"]}


# ------------------------------------------------------------------------------------------------ report
def report(args, results: dict[str, dict[int, Cell]], reload: dict | None, machine: list[str], seconds: float,
           costs: dict[str, float]) -> None:
    conc = args.concurrency
    print("\n".join(machine))
    print()
    head = f"{'':<32}" + "".join(f" | {'concurrency ' + str(c):^33}" for c in conc)
    sub = f"{'mode':<32}" + " | {:>8} {:>9} {:>9} {:>4}".format("img/s", "p50 ms", "p99 ms", "fail") * len(conc)
    print(head)
    print(sub)
    print("-" * len(sub))
    for key, label in MODES.items():
        cells = results.get(key, {})
        row = f"{label:<32}"
        for c in conc:
            cell = cells.get(c)
            row += (f" | {cell.rate:>8.2f} {cell.p50_ms:>9.0f} {cell.p99_ms:>9.0f} {cell.failed:>4d}" if cell
                    else f" | {'n/a':>8} {'':>9} {'':>9} {'':>4}")
        print(row)
    print()
    print("throughput ratios" + "".join(f" {'c=' + str(c):>8}" for c in conc))
    pairs = [("serve", "raw"), ("serve1", "raw"), ("plain", "raw"), ("serve", "plain"), ("serve1", "plain"),
             ("asgi", "base"), ("asgi-echo", "base-echo")]
    for a, b in pairs:
        row = f"{MODES[a][:3] + ' / ' + MODES[b][:3] + (' echo' if a.endswith('echo') else ''):<17}"
        for c in conc:
            x, y = results.get(a, {}).get(c), results.get(b, {}).get(c)
            row += f" {x.rate / y.rate:>7.2f}x" if x and y and y.rate > 0 else f" {'n/a':>8}"
        print(row)
    print()
    at = 32 if 32 in conc else max(conc)
    for a, b, target in TARGETS:
        x, y = results.get(a, {}).get(at), results.get(b, {}).get(at)
        ratio = x.rate / y.rate if x and y and y.rate > 0 else math.nan
        mark = "PASS" if ratio >= target else "MISS"
        print(f"target {MODES[a][:3]} >= {target}x {MODES[b][:3]} at concurrency {at}: {ratio:.2f}x  {mark}")
    if costs:
        print()
        print(f"middleware per request, in this process (POST /v1/echo as ASGI calls, 8 at a time, CPU time): "
              f"(5) BaseHTTPMiddleware {costs['base']:.0f} us, (6) ASGI middleware {costs['asgi']:.0f} us, "
              f"{costs['base'] / costs['asgi']:.2f}x")
    if reload is not None:
        r = reload
        print()
        print(f"hot reload under load: (2) at concurrency {args.reload_concurrency}, {r['swaps']} pushes one after "
              f"another (each after a random 0-{args.poll} s pause), replica polls the store every {args.poll} s")
        print(f"  swap latency (push -> first response with it): p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, "
              f"max {r['max']:.0f} ms; versions seen {r['seen']}/{r['swaps']}"
              + (f", never seen: {', '.join(r['missed'])}" if r["missed"] else ""))
        print(f"  requests {r['requests']}, failed {r['failed']} (target 0): {'PASS' if r['failed'] == 0 else 'MISS'};"
              f" {r['rate']:.2f} img/s over the {r['seconds']:.1f} s of swaps")
        print(f"  answered with an older version after a newer one was served: {r['went_back']} requests "
              f"({'none' if r['went_back'] == 0 else 'WENT BACK'})")
    print()
    print("notes:")
    print(f"  - window {args.warmup:g} s warm-up + {args.duration:g} s measured per cell; p50/p99 over the requests "
          "answered in the window (raw: over batches, an image's latency is its batch's)")
    print("  - HTTP throughput: per client worker, answers per second between its first and last answer in the "
          "window, summed")
    print(f"  - the client (asyncio + httpx, this process) and Ray's own processes share the {os.cpu_count()} CPUs "
          "with the server; (1) has no client and no HTTP")
    print(f"  - (2) and (3): one replica with num_cpus={args.cpus}, max_ongoing_requests 64; (2) max_batch_size "
          f"{args.max_batch_size}, batch_wait_timeout_s {args.batch_wait}; (3) max_batch_size 1; Serve's logs go to "
          "files only (RAY_SERVE_LOG_TO_STDERR=0)")
    print("  - (5) and (6): (4)'s server with the deployment's exception handlers and metrics, its middleware as "
          "BaseHTTPMiddleware (5, as it was) or plain ASGI (6, ErrorsAndMetrics); /v1/echo: the body read and "
          "checked, no image")
    worst = OTHER_LOAD.worst()
    if worst is not None:
        clean = worst[1] < QUIET_CPUS
        print(f"  - CPU used by processes outside this run during the cells: at most {worst[1]:.2f} CPUs ({worst[0]})"
              + ("" if clean else "  WARNING: another job shared the CPUs, these figures are not clean")
              + (f"; measured again after another job used the CPUs: {', '.join(OTHER_LOAD.retried)}"
                 if OTHER_LOAD.retried else ""))
    print(f"  - total run time {seconds:.0f} s (before shutting Ray down); load average at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")


# ------------------------------------------------------------------------------------------------ main
def measure(args, label: str, run: Callable[[], object]) -> object:
    """``run()``, measured again (up to ``--retries`` times) when another job used the CPUs meanwhile."""
    for attempt in range(args.retries + 1):
        OTHER_LOAD.start()
        result = run()
        OTHER_LOAD.stop(label)
        other = OTHER_LOAD.cells.get(label, 0.0)
        if other < QUIET_CPUS or attempt == args.retries:
            return result
        log(f"{label}: other processes used {other:.2f} CPUs meanwhile; waiting for them to go quiet, then again")
        OTHER_LOAD.retried.append(label)
        if not OTHER_LOAD.wait_quiet(args.quiet_timeout):
            log(f"  still busy after {args.quiet_timeout:g} s, measuring anyway")
    return result


def measure_cells(args, results: dict[str, dict[int, Cell]], runs: dict[str, Callable[[int], Cell]]) -> None:
    """Each mode of ``runs`` at each concurrency; at each, the modes one right after the other (the same load)."""
    for c, (key, run) in ((c, kv) for c in args.concurrency for kv in runs.items()):
        label = f"{MODES[key][:3]} {key} c={c}"
        results[key][c] = cell = measure(args, label, lambda: run(c))  # noqa: B023 - called at once
        log(f"{MODES[key]}, concurrency {c}: {cell.rate:.2f} img/s, p50 {cell.p50_ms:.0f} ms, p99 {cell.p99_ms:.0f} "
            f"ms, {cell.failed} failed; other processes used {OTHER_LOAD.cells.get(label, math.nan):.2f} CPUs")


def machine_lines(args, size: int, params: int) -> list[str]:
    import ray

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return [f"machine: {os.cpu_count()} CPUs ({cpu}); torch {torch.__version__}, {torch.get_num_threads()} threads "
            f"in this process and {args.cpus} in each server; Ray {ray.__version__}; httpx {httpx.__version__}",
            f"model {args.model} (random weights, {params / 1e6:.1f} M parameters) at {size} px, "
            f"{len(CATEGORIES)} categories; {len(args.images)} PNG images of 320x240 "
            f"({sum(map(len, args.images)) // len(args.images) // 1024} KiB on average) as raw bytes",
            f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="rn50")
    parser.add_argument("--quick", action="store_true", help="short windows (smoke run)")
    parser.add_argument("--duration", type=float, help="measured seconds per cell (default 20, quick 3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per cell (default 5, quick 1)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the Ray cluster and each server")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s of (2)")
    parser.add_argument("--poll", type=float, default=0.5, help="poll_interval_s of the replica")
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--reload-concurrency", type=int, default=8)
    parser.add_argument("--retries", type=int, default=3,
                        help="measure a cell again, up to this many times, when another job used the CPUs meanwhile")
    parser.add_argument("--quiet-timeout", type=float, default=300, help="longest wait for other jobs to go quiet")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["raw", "plain", "serve", "serve1", "reload", "middleware"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: every mode on one GPU (the Serve replica asks for it), bf16 autocast")
    parser.add_argument("--plain-server", nargs=2, metavar=("PORT", "CHECKPOINT"), help=argparse.SUPPRESS)
    parser.add_argument("--middleware", choices=["none", "base", "asgi"], default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.plain_server:
        plain_server(int(args.plain_server[0]), args.plain_server[1], args.cpus, args.device, args.middleware)
        return
    args.duration = args.duration or (3.0 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 5.0)
    torch.set_num_threads(args.cpus)
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")  # replica logs to files: keep this output a report

    signal.signal(signal.SIGTERM, _terminated)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    results: dict[str, dict[int, Cell]] = {key: {} for key in MODES}
    reload = None
    costs: dict[str, float] = {}  # middleware kind: CPU microseconds per request (middleware_cost)
    servers: list[subprocess.Popen] = []  # plain servers running
    ray_started = False
    try:
        torch.manual_seed(0)
        model = create_model(args.model, CATEGORIES, **MODELS[args.model]).eval()
        checkpoint = save_checkpoint(model, tmp / "checkpoint")
        from sarl.platform.vocab_store import VocabStore

        store = VocabStore(tmp / "store")
        store.push(vocabulary(1))
        cfg = model.config
        transform = build_transforms(cfg.image_size, cfg.mean, cfg.std, train=False)
        args.images = make_images()
        machine = machine_lines(args, cfg.image_size, sum(p.numel() for p in model.parameters()))
        log(machine[0])
        log(machine[1])

        model = model.to(DEVICE)
        if "raw" not in args.skip:
            bound = bind_vocabulary(model, vocabulary(1))
            measure_cells(args, results, {"raw": lambda c: raw_cell(model, bound, transform, args.images, c,
                                                                    args.warmup, args.duration)})

        if "plain" not in args.skip:  # before Ray starts, so that its processes are not running
            plain, url = start_plain(checkpoint, args.cpus)
            servers.append(plain)
            log(f"(4) plain FastAPI + uvicorn on {url}")
            measure_cells(args, results, {"plain": lambda c: http_cell(url, args.images, c, args.warmup,
                                                                       args.duration)})
            stop_servers(servers)

        if "middleware" not in args.skip:  # (5) and (6): both servers up, each cell right after the other's
            urls = {}
            for kind in ("base", "asgi"):
                plain, urls[kind] = start_plain(checkpoint, args.cpus, kind)
                servers.append(plain)
            log(f"(5) BaseHTTPMiddleware on {urls['base']}, (6) ASGI middleware on {urls['asgi']}")
            measure_cells(args, results, {
                key: lambda c, url=urls[kind], path=path: http_cell(url, args.images, c, args.warmup, args.duration,
                                                                     path)
                for key, (kind, path) in MIDDLEWARE_MODES.items()})
            stop_servers(servers)
            for _ in range(3):  # alternated, the best of three each
                for kind in ("base", "asgi"):
                    costs[kind] = min(costs.get(kind, math.inf), middleware_cost(kind))
            log(f"middleware per request, in this process: base {costs['base']:.0f} us, asgi {costs['asgi']:.0f} us")

        if not {"serve", "serve1", "reload"} <= set(args.skip):
            from sarl.platform.cluster import init_ray

            init_ray(num_cpus=args.cpus, dashboard=False)  # GPUs: detected by Ray
            ray_started = True
            signal.signal(signal.SIGTERM, _terminated)  # Ray's driver installs its own handler, which aborts
            port = free_port()
            user = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait,
                    "poll_interval_s": args.poll}
            url = deploy_serve(checkpoint, tmp / "store", port, args.cpus, user)
            threads = replica_threads()
            log(f"(2) Serve on {url}: {threads}")
            machine.append(f"Serve replica: {threads}")
            if "serve" not in args.skip:
                measure_cells(args, results, {"serve": lambda c: http_cell(url, args.images, c, args.warmup,
                                                                           args.duration)})
            if "reload" not in args.skip:
                reload = measure(args, "hot reload", lambda: hot_reload(url, store, args.images, args.swaps,
                                                                       args.reload_concurrency, args.poll))
                log(f"hot reload: p50 {reload['p50']:.0f} ms, p99 {reload['p99']:.0f} ms, failed {reload['failed']}")
            if "serve1" not in args.skip:
                deploy_serve(checkpoint, tmp / "store", port, args.cpus, {**user, "max_batch_size": 1})
                log(f"(3) reconfigured to max_batch_size 1: {replica_threads()}")
                measure_cells(args, results, {"serve1": lambda c: http_cell(url, args.images, c, args.warmup,
                                                                            args.duration)})
        report(args, results, reload, machine, time.perf_counter() - _T0, costs)  # before Ray's shutdown messages
        sys.stdout.flush()
    finally:
        stop_servers(servers)
        if ray_started:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
