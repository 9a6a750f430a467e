"""Online prediction on Ray Serve: one autoscaled deployment with a FastAPI ingress, dynamic batching, and a
vocabulary that replicas reload while serving.

    serve run serve_configs/local.yaml          # or: sarl serve --checkpoint URI --vocab-store URI [--gpus 1]

Heavy state (the checkpoint's model, on the replica's GPU when it has one) is loaded in ``__init__``; light
state comes from ``user_config`` through ``reconfigure`` (batch size, batch wait, poll interval, backoff cap, a
pinned vocabulary version), so changing it never restarts a replica. A background thread follows the vocabulary
store (``vocabulary.VocabularyWatcher``: retries, refusals, limits): it builds a new version's per-category
tensors off the request path, then swaps one reference. A batch reads that reference once, so every response
comes from exactly one vocabulary version, and it names it, with the model (``aliases``: id and digest).

A request: the body is read and checked (``io``), the image decoded on the decode pool, the batch scored
on the forward thread (stack, copy to the device, forward, copy back: never on the event loop). Every response
and every error is JSON with the request id; the ``sarl_*`` metrics (``metrics``) count and time it (plain ASGI
middleware, :class:`ErrorsAndMetrics`).

Label Studio's ML backend protocol is served under ``/label-studio`` (``label_studio``: the allow-list of task
image sources is ``ServeArgs.label_studio``); its images take the same decode pool and batching queue.

Before any replica is built (``build_app``, ``deploy``; ``sarl serve`` before Ray starts) the checkpoint's files
and the vocabulary store are checked (:func:`resolve_args`): a typo is one line, not a failed deployment.

Memory of a replica, what its ``ray_actor_options.memory`` should ask for (``serve_configs/*.yaml`` do):

- request bodies: at most ``max_buffered_body_bytes`` (256 MiB) held at once, all requests together, and as much
  again in passing copies (a body's bytes, a base64 or multipart body's image). Each request alone may carry
  ``max_body_bytes`` (50 MiB, a full-resolution photo), so ``max_ongoing_requests`` x ``max_body_bytes`` would be
  1.6 GB at 32 requests and 6.4 GB at 128; a body that would go over the budget is refused with 503 (retry)
  instead (``io.BodyBudget``);
- decoding, one image per decode thread (``decode_threads``: the replica's CPUs): a JPEG decodes at reduced scale
  (``Image.draft``) to at least the model's input size, under a byte a pixel of the photo at the peak; other
  formats at full size, 8 bytes a pixel at the peak (16 with transparency, composited over white), so up to
  0.8 GB (1.6 GB) for an image of ``max_image_pixels`` (100 M);
- the process: torch, Ray, the model and a batch's activations (1 GB on the CPU with the tiny model; more with a
  large one, and beside a GPU).

So 3 GiB for one decode thread and a small model (``local.yaml``), 12 GiB for 4 threads and RN101 on a GPU
(``production.yaml``); without transparent PNGs of 100 MP, much less. Serve's proxy also holds what a client sent
until the replica reads it: requests queued for a busy deployment keep their bodies there, so the shipped configs
set the deployment's ``max_queued_requests`` (per proxy; a request beyond it gets 503 at once, without its body
being held).
"""

import asyncio
import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...model.checkpoint import IDENTITY_FILES
from ...model.serving import BoundVocabulary
from .. import storage
from ..aliases import is_alias, read_alias
from ..vocab_store import VocabStore
from .io import BodyBudget, RequestError, parse_predict_request
from .label_studio import PREFIX as LABEL_STUDIO_PREFIX
from .label_studio import LabelStudioArgs, LabelStudioBackend
from .scoring import DEFAULT_MAX_PIXELS, ImageScorer
from .vocabulary import VocabularyLimits, VocabularyWatcher

logger = logging.getLogger("ray.serve")

APP_NAME = "sarl"
REASONS = {400: "bad_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
           413: "too_large", 415: "unsupported_media_type", 422: "invalid_request", 500: "internal",
           502: "bad_gateway", 503: "unavailable"}
PROBE_TIMEOUT_S = 30.0  # a health probe forward slower than this marks the replica unhealthy
DRAIN_BYTES = 64 * 1024 * 1024  # the most of an unread body read and dropped before an answer (ErrorsAndMetrics)


class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args`` of a Serve config file); unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint directory, s3:// URI, or an alias file (<run>/aliases/*.json)")
    vocab_store: str | None = Field(None, description="vocabulary store (path or s3://); None: the checkpoint's")
    word_vectors: str | None = Field(None, description="word vectors for zero-shot categories of word-vector models")
    device: str = Field("auto", description="'auto' (CUDA when the replica has a GPU), 'cpu' or 'cuda'")
    max_body_bytes: int = Field(50 * 1024 * 1024, gt=0, description="a larger request body is 413")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="refuse larger images before decoding them")
    max_buffered_body_bytes: int = Field(256 * 1024 * 1024, gt=0, description="request bodies a replica holds at "
                                         "once, all requests together; a request over it is 503 (io.BodyBudget)")
    max_categories: int = Field(VocabularyLimits.max_categories, gt=0, description="per vocabulary version")
    max_prompt_tokens: int = Field(VocabularyLimits.max_prompt_tokens, gt=2, description="per zero-shot prompt")
    decode_threads: int | None = Field(None, gt=0, description="image decoding threads; default: the replica's CPUs")
    label_studio: LabelStudioArgs = Field(default_factory=LabelStudioArgs, description="Label Studio's ML backend "
                                          f"protocol at {LABEL_STUDIO_PREFIX}: where task images may be fetched from")
    resolved: dict | None = Field(None, description="set when the app is built: the alias's checkpoint, digest and "
                                                    "model id, so every replica of a deployment serves one model")

    @model_validator(mode="after")
    def _budget_holds_a_body(self) -> "ServeArgs":
        if self.max_buffered_body_bytes < self.max_body_bytes:
            raise ValueError(f"max_buffered_body_bytes ({self.max_buffered_body_bytes}) is under max_body_bytes "
                             f"({self.max_body_bytes}): a body of the largest size would always be refused")
        return self


class UserConfig(BaseModel):
    """Light, live settings from ``user_config``: applied by ``reconfigure`` without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    poll_interval_s: float = Field(2.0, gt=0, description="how often a replica checks the vocabulary store")
    max_retry_interval_s: float = Field(60.0, gt=0, description="store-outage backoff cap")
    vocabulary_version: str | None = Field(None, description="pin a version; None follows the store's current "
                                                             "pointer")


DEFAULT_USER_CONFIG = UserConfig().model_dump()


app = FastAPI(title="SARL multi-label prediction", version="1")


def _request_id(scope: Scope) -> str:
    """Serve's id of the request (the proxy's ``x-request-id``: the client's, or one it made), else a new one."""
    from ray.serve.context import _get_serve_request_context  # Serve puts the id in the replica's request context

    return (_get_serve_request_context().request_id or Headers(scope=scope).get("x-request-id")
            or uuid.uuid4().hex)


def error_response(status: int, message: str, request_id: str, reason: str | None = None,
                   detail: object = None) -> JSONResponse:
    body = {"error": message, "status": status, "reason": reason or REASONS.get(status, "error"),
            "request_id": request_id}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)  # Serve's proxy adds the x-request-id header to every response


def internal_error(exc: BaseException) -> tuple[int, str, str]:
    """Status, client message and reason of an unexpected exception (its text stays in the log)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return 503, "the model ran out of memory on this batch; retry", "out_of_memory"
    return 500, "internal error while scoring the image; see the replica log for the request id", "internal"


class ErrorsAndMetrics:
    """Every unexpected exception becomes a JSON error with the request id (Serve's proxy puts the id in each
    response's ``x-request-id`` header and Serve's replica log lines); counts the prediction requests; reads what
    is left of a body the app answered without reading (413, 415, 503, ...) before the answer goes out.

    That last one: a client that writes its whole body before it reads (urllib, and any that sends
    ``Connection: close``, after which the proxy's uvicorn closes the connection as soon as the answer is written)
    had its connection reset by the unread rest instead of reading its 413 (42 of 50 uploads of 11 MB over a 1 MB
    limit, under load). Up to ``DRAIN_BYTES`` are read and dropped, a chunk at a time, so nothing is held; past
    that the answer goes out as it is.

    Plain ASGI middleware, which sets ``request.state.request_id`` and watches the messages as they pass:
    Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``) ran each request through a task group and a
    memory stream of the response, a cost on every request (``bench/serve.py`` compares the two).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})  # what request.state reads and writes
        state["request_id"] = request_id
        app_state = scope["app"].state if "app" in scope else None
        headers = Headers(scope=scope)
        unread = (headers.get("content-length", "0") != "0"
                  or "chunked" in headers.get("transfer-encoding", "").lower())
        status, reason = None, None

        async def received() -> Message:
            nonlocal unread
            message = await receive()
            unread = unread and message["type"] == "http.request" and message.get("more_body", False)
            return message

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                dropped = 0
                while unread and dropped <= DRAIN_BYTES:
                    dropped += len((await received()).get("body", b""))
            await send(message)

        try:
            await self.app(scope, received, watched)
        except Exception as exc:  # noqa: BLE001 - the client gets JSON, the log gets the traceback
            if status is not None:  # the response has started: too late for another
                raise
            status, message, reason = internal_error(exc)
            logger.exception("request %s failed (%s)", request_id, reason)
            await error_response(status, message, request_id, reason)(scope, received, watched)
        metrics = getattr(app_state, "metrics", None)
        if metrics is not None and status is not None and scope["path"].endswith("/v1/predict"):
            metrics.request(status, reason or state.get("reason")
                            or ("ok" if status < 400 else REASONS.get(status, "error")))


app.add_middleware(ErrorsAndMetrics)


@app.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    request.state.reason = REASONS.get(exc.status, "error")
    response = error_response(exc.status, exc.message, request.state.request_id, detail=exc.detail)
    if exc.status == 503:  # the body budget is full: a moment later it is not
        response.headers["retry-after"] = "1"
    return response


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
    message = "; ".join(f"{d['field']}: {d['message']}" for d in detail)
    return error_response(422, message, request.state.request_id, detail=detail)


@app.exception_handler(404)
@app.exception_handler(405)
async def _http_error(request: Request, exc: Any) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), getattr(request.state, "request_id", ""))


# Module-level helpers the deployment uses are defined above it: Serve serialises the class when decorated.
def _response(probs: list[float], bound: BoundVocabulary, top_k: int | None, threshold: float | None,
              replica: str, model: dict[str, str], request_id: str) -> dict:
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
    return {"vocabulary_version": bound.version, "model": model, "labels": labels,
            "scores": {c.name: round(p, 6) for p, c, _ in rows}, "replica": replica, "request_id": request_id}


def is_fatal_device_error(exc: BaseException) -> bool:
    """A CUDA error that leaves the device unusable (not an out-of-memory error, which the next batch survives)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc))


@dataclass
class ModelHealth:
    """What the replica knows about its model: the last good forward, and a fatal device error if one happened."""

    last_ok: float = field(default_factory=time.monotonic)
    fatal: str | None = None

    def ok(self) -> None:
        self.last_ok = time.monotonic()

    def failed(self, exc: BaseException) -> None:
        if is_fatal_device_error(exc):
            self.fatal = f"{type(exc).__name__}: {exc}"


def _replica_cpus() -> int:
    import ray

    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # noqa: BLE001 - outside a Ray worker
        cpus = os.cpu_count() or 1
    return max(1, int(round(cpus)))


@serve.deployment(
    user_config=DEFAULT_USER_CONFIG,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
@serve.ingress(app)
class Predictor:
    """One replica: the model, the bound vocabulary and its watcher, two executors, health and metrics."""

    def __init__(self, args: ServeArgs) -> None:
        from .metrics import ServeMetrics

        self.args = args
        self.scorer = ImageScorer(args.checkpoint, args.device, args.resolved, args.word_vectors,
                                  args.max_image_pixels)
        self.model, self.device, self.model_info = self.scorer.model, self.scorer.device, self.scorer.model_info
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.config = UserConfig()
        # Decoding never queues the forward: the forward has its own single thread (one batch at a time on the
        # device), decodes a pool sized to the replica's CPUs. Neither is the event loop.
        self.forward_pool = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.decode_pool = ThreadPoolExecutor(args.decode_threads or _replica_cpus(), thread_name_prefix="decode")
        self.health = ModelHealth()
        self.bodies = BodyBudget(args.max_buffered_body_bytes)
        self._probe: asyncio.Future | None = None  # the probe forward in flight, shared by its callers
        self.metrics = ServeMetrics(self.model_info["id"], self.model_info["digest"])
        app.state.metrics = self.metrics
        store = VocabStore(args.vocab_store, fail_fast=True) if args.vocab_store else None
        limits = VocabularyLimits(args.max_categories, args.max_prompt_tokens)
        self.watcher = VocabularyWatcher(store, self.scorer.bind(self.model.vocabulary), self.scorer.bind,
                                         self.model.vocabulary, limits, on_outcome=self.metrics.reload)
        self._refresh()  # never raises: an unreachable store leaves the checkpoint's vocabulary serving
        self.label_studio = LabelStudioBackend(args.label_studio, args.max_body_bytes, self.bodies, self._decode,
                                               self._score_one, lambda: self.watcher.bound, self.model_info)
        # Warm-up: the first request should not pay for lazy initialisation, and a model that cannot run on this
        # device fails the replica here, before it takes traffic.
        self.scorer.score(self.watcher.bound, [self.scorer.blank()])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vocabulary-watcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------ live settings
    def reconfigure(self, user_config: dict) -> None:
        previous = self.config.vocabulary_version
        self.config = UserConfig.model_validate(user_config or {})
        self._score_batch.set_max_batch_size(self.config.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        # A newly pinned (or unpinned) version takes effect now, not after the next poll; never raises.
        self._refresh(force=self.config.vocabulary_version != previous)

    async def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``; raising takes the replica out of rotation and
        replaces it. Unhealthy: the watcher thread died, the device had a fatal error, or (when no batch ran
        lately) a one-image probe forward fails or hangs."""
        if not self._thread.is_alive():
            raise RuntimeError("the vocabulary watcher thread died")
        if self.health.fatal:
            raise RuntimeError(f"the model's device failed: {self.health.fatal}")
        if time.monotonic() - self.health.last_ok > 10:
            await self._probe_forward()

    # ------------------------------------------------------------------------------------ vocabulary
    def _watch(self) -> None:
        while not self._stop.wait(self.config.poll_interval_s):
            self._refresh()

    def _refresh(self, force: bool = False) -> None:
        self.watcher.refresh(self.config.vocabulary_version, self.config.poll_interval_s,
                             self.config.max_retry_interval_s, force=force)
        self.metrics.served(self.watcher.bound.version)

    # ------------------------------------------------------------------------------------ scoring
    async def _probe_forward(self) -> None:
        """A one-image forward, failed after ``PROBE_TIMEOUT_S``. Callers that come while one is in flight (load
        balancers and kubelets polling ``/readyz``, Serve's health check) await that one: a burst of probes
        costs one forward, not one each queued behind the others."""
        if self._probe is None:
            self._probe = asyncio.ensure_future(
                asyncio.wait_for(self._forward([self.scorer.blank()], self.watcher.bound), PROBE_TIMEOUT_S))
            self._probe.add_done_callback(lambda _: setattr(self, "_probe", None))
        await asyncio.shield(self._probe)  # a caller that gives up does not cancel the others' probe

    async def _forward(self, images: list[torch.Tensor], bound: BoundVocabulary) -> list[list[float]]:
        started = time.perf_counter()
        try:
            probs = await asyncio.get_running_loop().run_in_executor(self.forward_pool, self.scorer.score, bound,
                                                                     images)
        except Exception as exc:
            self.health.failed(exc)
            if isinstance(exc, torch.OutOfMemoryError) and self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise
        self.health.ok()
        self.metrics.forward.observe(time.perf_counter() - started)
        return probs

    @serve.batch(max_batch_size=DEFAULT_USER_CONFIG["max_batch_size"],
                 batch_wait_timeout_s=DEFAULT_USER_CONFIG["batch_wait_timeout_s"])
    async def _score_batch(self, items: list[tuple[torch.Tensor, float]]) -> list[tuple[list[float], BoundVocabulary]]:
        now = time.perf_counter()
        for _, queued in items:
            self.metrics.queue.observe(now - queued)
        self.metrics.batch_size.observe(len(items))
        bound = self.watcher.bound  # read once: the whole batch is scored under one vocabulary version
        probs = await self._forward([image for image, _ in items], bound)
        return [(row, bound) for row in probs]

    # ------------------------------------------------------------------------------------ HTTP API
    @app.post("/v1/predict")
    async def predict(self, request: Request, top_k: int | None = Query(None, ge=1),
                      threshold: float | None = Query(None, ge=0.0, le=1.0)) -> dict:
        image, top_k, threshold = await self._read_image(request, top_k, threshold)
        probs, bound = await self._score_one(image)
        return _response(probs, bound, top_k, threshold, self.replica, self.model_info, request.state.request_id)

    async def _read_image(self, request: Request, top_k: int | None,
                          threshold: float | None) -> tuple[torch.Tensor, int | None, float | None]:
        """The request's image, decoded and transformed, and its options. Its body counts against the replica's
        body budget until then (503 over it); the bytes are dropped before the batch waits."""
        with self.bodies.hold() as take:
            parsed = await parse_predict_request(request, self.args.max_body_bytes, top_k, threshold, take)
            image = await self._decode(parsed.image)
        return image, parsed.top_k, parsed.threshold

    async def _decode(self, data: bytes) -> torch.Tensor:
        """Image bytes to the model's input on the decode pool (``io.RequestError`` 400 / 413 for bad images)."""
        started = time.perf_counter()
        image = await asyncio.get_running_loop().run_in_executor(self.decode_pool, self.scorer.preprocess, data)
        self.metrics.decode.observe(time.perf_counter() - started)
        return image

    async def _score_one(self, image: torch.Tensor) -> tuple[list[float], BoundVocabulary]:
        """One decoded image through the batching queue: what ``/v1/predict`` and the Label Studio backend share."""
        return await self._score_batch((image, time.perf_counter()))

    @app.api_route(LABEL_STUDIO_PREFIX + "/{endpoint}", methods=["GET", "POST"])
    async def label_studio_backend(self, endpoint: str, request: Request) -> dict:
        """Label Studio's ML backend protocol (``label_studio``): health, setup, predict, webhook, versions."""
        return await self.label_studio.handle(endpoint, request)

    @app.get("/v1/vocabulary")
    def vocabulary(self) -> dict:
        """The served version and its categories (no store address, no exception text: those are logged)."""
        bound = self.watcher.bound
        categories = [{**c.to_dict(), "zero_shot": z} for c, z in zip(bound.vocabulary.categories, bound.zero_shot)]
        return {**self.watcher.state(), "pinned": self.config.vocabulary_version,
                "poll_interval_s": self.config.poll_interval_s, "model": self.model_info, "replica": self.replica,
                "categories": categories}

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "replica": self.replica}

    @app.get("/readyz")
    async def readyz(self, request: Request) -> Any:
        """200 when the model answered a forward in the last 5 s (a batch, else a one-image probe now) and the
        watcher runs; 503 (JSON) otherwise. The vocabulary state is reported: a store outage is not unready."""
        state = self.watcher.state()
        problem = None
        if self.health.fatal or not self._thread.is_alive():
            problem = "the model's device failed" if self.health.fatal else "the vocabulary watcher stopped"
        elif time.monotonic() - self.health.last_ok > 5:  # no batch lately: check the model answers
            try:
                await self._probe_forward()
            except Exception:  # noqa: BLE001 - logged; the client sees 503
                logger.exception("readiness probe forward failed")
                problem = "the model failed a probe forward"
        if problem:
            return error_response(503, problem, request.state.request_id)
        return {"status": "ready", "vocabulary_version": state["version"], "vocabulary_source": state["source"],
                "vocabulary_error": state["last_error"], "model": self.model_info, "replica": self.replica}


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application for ``args`` (a dict from a config file is validated into :class:`ServeArgs`), after
    :func:`resolve_args`: a missing checkpoint or store fails the build with one message, not every replica."""
    return Predictor.bind(resolve_args(args))


def resolve_args(args: ServeArgs | dict) -> ServeArgs:
    """``args`` validated, with what the replicas need settled, and checked before any replica starts.

    Local paths are made absolute, against the directory the app is built from, because replicas may run in
    other working directories. An alias is resolved (``ServeArgs.resolved``, unless already set): replicas
    started later by autoscaling serve the same checkpoint as the others even if the alias has moved since.
    Then :func:`check_sources`. Raises FileNotFoundError (naming the path), ``AliasError``, ``StorageError``.
    """
    args = args.model_copy() if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    for key in ("checkpoint", "vocab_store", "word_vectors"):
        value = getattr(args, key)
        if value and not storage.is_s3(value):
            setattr(args, key, str(storage.local_path(value)))
    if is_alias(args.checkpoint) and args.resolved is None:
        if not _exists(args.checkpoint):
            raise FileNotFoundError(f"alias {args.checkpoint} does not exist")
        record = read_alias(args.checkpoint)
        args.resolved = {k: record[k] for k in ("checkpoint", "digest", "model_id")}
    check_sources(args)
    return args


def check_sources(args: ServeArgs) -> None:
    """The checkpoint (an alias's, once resolved) holds the files a replica loads, and the vocabulary store (when
    given) exists: a HEAD or a stat each (a listing for what is missing). Else FileNotFoundError naming the path;
    StorageError when S3 cannot be asked."""
    checkpoint = args.resolved["checkpoint"] if args.resolved else args.checkpoint
    missing = [name for name in IDENTITY_FILES if not _exists(storage.join(checkpoint, name))]
    if missing:
        alias = f" (named by the alias {args.checkpoint})" if args.resolved else ""
        problem = (f"is not a SARL checkpoint (no {', '.join(missing)})" if _exists(checkpoint)
                   else "does not exist")
        raise FileNotFoundError(f"checkpoint {checkpoint}{alias} {problem}")
    if args.vocab_store and not _exists(args.vocab_store):
        raise FileNotFoundError(f"vocabulary store {args.vocab_store} does not exist (`sarl vocab push FILE --store "
                                f"{args.vocab_store}` creates it)")


def _exists(uri: str) -> bool:
    try:
        return storage.exists(uri)
    except Exception as exc:  # noqa: BLE001 - botocore's: refused, unreachable, no credentials
        raise storage.StorageError(f"cannot check {uri}: {exc}") from exc


@dataclass
class ServeConfig:
    """The parts of a Serve config file (``serve_configs/*.yaml``) that describe the ``sarl`` application."""

    http_options: dict = field(default_factory=lambda: {"host": "127.0.0.1", "port": 8000})
    args: dict = field(default_factory=dict)
    deployment: dict = field(default_factory=dict)  # options of the Predictor deployment, as Deployment.options takes
    name: str = APP_NAME
    route_prefix: str = "/"
    proxy_location: str | None = None  # HeadOnly, EveryNode or Disabled; None: Serve's default (EveryNode)


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
    http = config.http_options.model_dump(exclude_unset=True)  # every HTTP option the file sets
    proxy = config.proxy_location.value if "proxy_location" in config.model_fields_set else None
    return ServeConfig(http, dict(app_config.args), options, app_config.name, app_config.route_prefix or "/", proxy)


def with_gpus(config: ServeConfig, gpus: float) -> ServeConfig:
    """``config`` with ``gpus`` GPUs per replica (``sarl serve --gpus``); 0 serves on the CPU."""
    actor = dict(config.deployment.get("ray_actor_options") or {})
    actor["num_gpus"] = gpus
    args = {**config.args, "device": "cuda" if gpus > 0 else "cpu"}
    return dataclasses.replace(config, deployment={**config.deployment, "ray_actor_options": actor}, args=args)


def deploy(args: ServeArgs | dict, config: ServeConfig | None = None) -> str:
    """Start Serve (HTTP options from ``config``) and run the app on the connected Ray cluster; returns its URL.

    Running it again replaces the replicas (``serve.run`` gives the deployment a new version); to change only
    ``user_config`` without restarting them, redeploy the config file with ``serve deploy``.
    """
    config = config or ServeConfig()
    serve.start(http_options=config.http_options,
                **({"proxy_location": config.proxy_location} if config.proxy_location else {}))
    serve.run(Predictor.options(**config.deployment).bind(resolve_args(args)), name=config.name,
              route_prefix=config.route_prefix)
    host = config.http_options.get("host", "127.0.0.1")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{config.http_options.get('port', 8000)}"


def serve_forever(args: ServeArgs | dict, config: ServeConfig | None = None, address: str | None = None) -> None:
    """``sarl serve``: deploy on the cluster at ``address`` (default: $RAY_ADDRESS, else a local one) until Ctrl-C."""
    from ..cluster import init_ray

    init_ray(address)
    # SIGTERM (docker stop, systemd, Kubernetes) stops it as Ctrl-C does: ray.init's handler (sys.exit) would end
    # the process with the application still deployed. Installed before the deploy, which can take a while: a
    # SIGTERM then deletes the application as soon as it is up. The handler only sets the event.
    stopping = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    url = deploy(args, config)
    name = config.name if config else APP_NAME
    print(f"serving on {url}: POST {url}/v1/predict, GET {url}/v1/vocabulary (Ctrl-C or SIGTERM stops)",
          flush=True)
    try:
        stopping.wait()
        print(f"SIGTERM: deleting the Serve application {name!r}", flush=True)
    except KeyboardInterrupt:
        print(f"deleting the Serve application {name!r}", flush=True)
    finally:
        # Only this application: on a shared cluster (--address) serve.shutdown() would stop every app on it.
        serve.delete(name)
        signal.signal(signal.SIGTERM, previous)

