"""Online prediction on Ray Serve: one autoscaled deployment with a FastAPI ingress, dynamic batching, and a
vocabulary that replicas reload while serving.

    serve run serve_configs/local.yaml          # or: sarl serve --checkpoint URI --vocab-store URI

Heavy state (the checkpoint's model) is loaded in ``__init__``; light state comes from ``user_config`` through
``reconfigure`` (batch size, batch wait, poll interval, a pinned vocabulary version), so changing it never
restarts a replica. A background thread follows the vocabulary store's current pointer: it builds the new
version's per-category tensors off the request path (``bind_vocabulary``: text features once per version, never
per request), then swaps one reference. A batch reads that reference once, so every response comes from exactly
one vocabulary version, and it names it. A version that fails to load leaves the previous one serving and is
reported as ``last_error`` by ``GET /v1/vocabulary``.
"""

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from ..model.checkpoint import load_checkpoint
from ..model.data.transforms import build_transforms
from ..model.serving import BoundVocabulary, bind_vocabulary
from . import storage
from .serve_io import RequestError, decode_image, parse_predict_request
from .vocab_store import VocabStore
from .word_vectors import load as load_vectors

logger = logging.getLogger("ray.serve")

APP_NAME = "sarl"
DEFAULT_USER_CONFIG = {"max_batch_size": 16, "batch_wait_timeout_s": 0.01, "poll_interval_s": 2.0,
                       "vocabulary_version": None}


class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args`` of a Serve config file); unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint directory or s3:// URI")
    vocab_store: str | None = Field(None, description="vocabulary store (path or s3://); None: the checkpoint's")
    word_vectors: str | None = Field(None, description="word vectors for zero-shot categories of word-vector models")
    device: str = Field("auto", description="'auto' (CUDA when the replica has a GPU), 'cpu' or 'cuda'")
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0, description="refuse larger images before decoding them")


class UserConfig(BaseModel):
    """Light, live settings from ``user_config``: applied by ``reconfigure`` without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(DEFAULT_USER_CONFIG["max_batch_size"], ge=1)
    batch_wait_timeout_s: float = Field(DEFAULT_USER_CONFIG["batch_wait_timeout_s"], ge=0)
    poll_interval_s: float = Field(DEFAULT_USER_CONFIG["poll_interval_s"], gt=0)
    vocabulary_version: str | None = None  # pin a version; None follows the store's current pointer


app = FastAPI(title="SARL multi-label prediction", version="1")


@app.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    detail = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
    message = "; ".join(f"{d['field']}: {d['message']}" for d in detail)
    return JSONResponse({"error": message, "status": 422, "detail": detail}, status_code=422)


# Module-level helpers the deployment uses are defined above it: Serve serialises the class when decorated.
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _response(probs: list[float], bound: BoundVocabulary, top_k: int | None, threshold: float | None,
              replica: str) -> dict:
    """Scores of the enabled categories (best first, at most ``top_k``) and the labels at or above threshold."""
    rows = [(p, c, z) for p, c, z in zip(probs, bound.vocabulary.categories, bound.zero_shot) if c.enabled]
    rows.sort(key=lambda r: -r[0])
    if top_k is not None:
        rows = rows[:top_k]
    labels = []
    for p, c, z in rows:
        cut = c.threshold if threshold is None else threshold
        if p >= cut:
            labels.append({"name": c.name, "score": round(p, 6), "threshold": cut, "zero_shot": z})
    return {"vocabulary_version": bound.version, "labels": labels,
            "scores": {c.name: round(p, 6) for p, c, _ in rows}, "replica": replica}


@serve.deployment(
    user_config=DEFAULT_USER_CONFIG,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
@serve.ingress(app)
class Predictor:
    """One replica: the model, the bound vocabulary, and the watcher that follows the vocabulary store."""

    def __init__(self, args: ServeArgs) -> None:
        self.args = args
        self.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if args.device == "auto" else args.device))
        checkpoint = storage.local_copy(args.checkpoint)
        self.model = load_checkpoint(checkpoint, map_location=self.device, resolve=storage.local_copy).eval()
        cfg = self.model.config
        self.transform = build_transforms(cfg.image_size, cfg.mean, cfg.std, train=False)
        self.word_vectors = load_vectors(args.word_vectors) if args.word_vectors else None  # pickles refused
        self.store = VocabStore(args.vocab_store) if args.vocab_store else None
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.config = UserConfig()
        self.last_error: dict[str, str] | None = None
        self._attempted: Any = None  # the pointer (or pinned version) last tried, so a bad one is not rebuilt per poll
        self._lock = threading.Lock()  # one reload at a time (the watcher, or reconfigure pinning a version)
        self.bound = self._bind_checkpoint_vocabulary()
        self._refresh()
        with torch.no_grad():  # warm-up: the first request should not pay for lazy initialisation
            self.bound.score(self.model, torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=self.device))
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="vocabulary-watcher", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------------------------ live settings
    def reconfigure(self, user_config: dict) -> None:
        self.config = UserConfig.model_validate({**DEFAULT_USER_CONFIG, **(user_config or {})})
        self._score_batch.set_max_batch_size(self.config.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self._refresh()  # a newly pinned (or unpinned) version takes effect now, not after the next poll

    def check_health(self) -> None:
        if not self._watcher.is_alive():
            raise RuntimeError("the vocabulary watcher thread died")

    # ------------------------------------------------------------------------------------ vocabulary
    def _bind_checkpoint_vocabulary(self) -> BoundVocabulary:
        return bind_vocabulary(self.model, self.model.vocabulary, self.word_vectors)

    def _watch(self) -> None:
        while not self._stop.wait(self.config.poll_interval_s):
            try:
                self._refresh()
            except Exception:  # the store being unreachable for a moment must not end the watcher
                logger.exception("vocabulary refresh failed")

    def _refresh(self) -> None:
        """Load the wanted vocabulary version if it is not the one served; on failure keep serving the old one."""
        if self.store is None:
            return
        with self._lock:
            pinned = self.config.vocabulary_version
            wanted = pinned or self.store.pointer()
            if wanted is None or wanted == self._attempted:
                return
            version = pinned or wanted["version"]
            self._attempted = wanted
            try:
                vocabulary = self.store.load(version)
                if vocabulary.fingerprint() == self.bound.vocabulary.fingerprint():
                    self.last_error = None
                    return
                started = time.perf_counter()
                bound = bind_vocabulary(self.model, vocabulary, self.word_vectors)
            except Exception as e:
                self.last_error = {"version": str(version), "message": str(e), "at": _now()}
                logger.warning("vocabulary version %s not loaded, still serving %s: %s", version,
                               self.bound.version, e)
                return
            self.bound, self.last_error = bound, None  # the swap: one reference
            logger.info("serving vocabulary version %s (built in %.0f ms)", bound.version,
                        1000 * (time.perf_counter() - started))

    # ------------------------------------------------------------------------------------ scoring
    @serve.batch(max_batch_size=DEFAULT_USER_CONFIG["max_batch_size"],
                 batch_wait_timeout_s=DEFAULT_USER_CONFIG["batch_wait_timeout_s"])
    async def _score_batch(self, images: list[torch.Tensor]) -> list[tuple[list[float], BoundVocabulary]]:
        bound = self.bound  # read once: the whole batch is scored under one vocabulary version
        batch = torch.stack(images).to(self.device)
        probs = await asyncio.to_thread(bound.score, self.model, batch)  # the event loop keeps taking requests
        return [(row, bound) for row in probs.cpu().tolist()]

    def _preprocess(self, data: bytes) -> torch.Tensor:
        return self.transform(decode_image(data, self.args.max_image_pixels))

    # ------------------------------------------------------------------------------------ HTTP API
    @app.post("/v1/predict")
    async def predict(self, request: Request, top_k: int | None = Query(None, ge=1),
                      threshold: float | None = Query(None, ge=0.0, le=1.0)) -> dict:
        parsed = await parse_predict_request(request, self.args.max_body_bytes, top_k, threshold)
        image = await asyncio.to_thread(self._preprocess, parsed.image)
        probs, bound = await self._score_batch(image)
        return _response(probs, bound, parsed.top_k, parsed.threshold, self.replica)

    @app.get("/v1/vocabulary")
    def vocabulary(self) -> dict:
        bound = self.bound
        categories = [{**c.to_dict(), "zero_shot": z} for c, z in zip(bound.vocabulary.categories, bound.zero_shot)]
        return {"version": bound.version, "fingerprint": bound.vocabulary.fingerprint(),
                "store": self.args.vocab_store, "pinned": self.config.vocabulary_version,
                "poll_interval_s": self.config.poll_interval_s, "last_error": self.last_error,
                "replica": self.replica, "categories": categories}

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "replica": self.replica}

    @app.get("/readyz")
    def readyz(self) -> dict:
        return {"status": "ready", "vocabulary_version": self.bound.version, "replica": self.replica}


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application for ``args`` (a dict from a config file is validated into :class:`ServeArgs`).

    Local paths are made absolute here, against the directory the app is built from, because replicas may run
    in other working directories.
    """
    return Predictor.bind(_resolve(args))


def _resolve(args: ServeArgs | dict) -> ServeArgs:
    args = args.model_copy() if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    for key in ("checkpoint", "vocab_store", "word_vectors"):
        value = getattr(args, key)
        if value and not storage.is_s3(value):
            setattr(args, key, str(Path(value).expanduser().resolve()))
    return args


@dataclass
class ServeConfig:
    """The parts of a Serve config file (``serve_configs/*.yaml``) that describe the ``sarl`` application."""

    http_options: dict
    args: dict
    deployment: dict  # options of the Predictor deployment, as ``Deployment.options`` takes them
    name: str = APP_NAME
    route_prefix: str = "/"


def read_serve_config(path: str | Path) -> ServeConfig:
    """Read and validate a Serve config file (Serve's own schema) holding the ``sarl`` application."""
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text()))
    apps = [a for a in config.applications if a.import_path.endswith(":build_app") and "sarl" in a.import_path]
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one application with import_path sarl.platform.serve:build_app")
    app_config = apps[0]
    options = next((d.model_dump(exclude_unset=True) for d in app_config.deployments if d.name == "Predictor"), {})
    options.pop("name", None)
    http = config.http_options.model_dump(include={"host", "port", "request_timeout_s", "keep_alive_timeout_s"})
    return ServeConfig(http, dict(app_config.args), options, app_config.name, app_config.route_prefix or "/")


def deploy(args: ServeArgs | dict, config: ServeConfig | None = None) -> str:
    """Start Serve (HTTP options from ``config``) and run the app on the connected Ray cluster; returns its URL.

    Running it again replaces the replicas (``serve.run`` gives the deployment a new version); to change only
    ``user_config`` without restarting them, redeploy the config file with ``serve deploy``.
    """
    config = config or ServeConfig({"host": "127.0.0.1", "port": 8000}, {}, {})
    serve.start(http_options=config.http_options)
    serve.run(Predictor.options(**config.deployment).bind(_resolve(args)), name=config.name,
              route_prefix=config.route_prefix)
    host = config.http_options.get("host", "127.0.0.1")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{config.http_options.get('port', 8000)}"


def serve_forever(args: ServeArgs | dict, config: ServeConfig | None = None, address: str | None = None) -> None:
    """``sarl serve``: deploy on the cluster at ``address`` (default: $RAY_ADDRESS, else a local one) until Ctrl-C."""
    from .train import init_ray

    init_ray(address)
    url = deploy(args, config)
    name = config.name if config else APP_NAME
    print(f"serving on {url}: POST {url}/v1/predict, GET {url}/v1/vocabulary (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(f"deleting the Serve application {name!r}", flush=True)
    finally:
        # Only this application: on a shared cluster (--address) serve.shutdown() would stop every app on it.
        serve.delete(name)

