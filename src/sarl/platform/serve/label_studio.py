"""Label Studio's ML backend protocol, served by the Serve app under ``/label-studio``: a Label Studio project
connected to ``<serve url>/label-studio`` pre-annotates the tasks it opens.

What Label Studio 1.23.2 calls (``label_studio/ml/api_connector.py`` ``MLApi``, ``ml/models.py`` ``MLBackend``,
``ml/serializers.py``), each a path under the backend's URL:

- ``GET /health`` when a backend is added (``POST /api/ml``) and before every prediction (``update_state``): any
  2xx JSON answer is healthy (the body is not read);
- ``POST /setup`` ``{project, schema, hostname, access_token, extra_params}`` right after: an error refuses the
  connection; the answer's ``model_version`` becomes the backend's. ``schema`` is the project's labelling config,
  checked here against the served vocabulary. ``hostname`` and ``access_token`` are ignored: images are fetched
  only from the operator's allow-list (:class:`LabelStudioArgs`) with the operator's token;
- ``POST /predict`` ``{tasks, project, label_config, params}`` when a task is opened (``evaluate_predictions``),
  for the Data Manager's "Retrieve Predictions" action and ``/api/ml/{id}/predict/test``; answered with
  ``{"results": [{"result": [...], "score": s, "model_version": v}, ...]}``, one per task, in order;
- ``POST /webhook``: Label Studio registers ``<url>/webhook`` for every project event when a backend is added
  (``create_ml_webhook``); acknowledged and ignored (this backend does not train from annotations);
- ``GET /versions`` (``/api/ml/{id}/versions``): the model version served now.

``/train``, ``/job_status``, ``/duplicate_model``, ``/delete`` and ``/validate`` exist in ``MLApi`` but are not called
when a project is connected or predicts; ``/train`` answers that training is ``sarl train``'s, the others 404.

Two labelling configs (``sarl annotate push`` generates them), told apart by their one ``<Choices>`` control (its
``name`` and ``toName`` are read from the config, and the data key from the ``<Image value="$key">`` it names):

- **entries**: single choice with the values ``present``, ``absent``, ``can't tell``; a task asks about the category
  in its data's ``category``: ``present`` when the category's score is at or above its threshold in the served
  vocabulary, else ``absent``; the prediction's ``score`` is the category's score;
- **images**: multiple choice, one ``<Choice>`` per category (names or aliases of the served vocabulary; any other
  value refuses the config): every category at or above its threshold is ticked; the prediction's ``score`` is the
  smallest margin ``|score - threshold|`` over the listed categories, as ``sarl annotate push`` scores its own
  images-mode pre-annotations (the least settled image sorts first either way).

Scores are those of ``POST /v1/predict`` for the same image (rounded alike): the image goes through the replica's
decode pool and batching queue, and ``model_version`` names the model id and the vocabulary version that scored it.

Images (:class:`ImageFetcher`): a task's ``data.<key>`` is a path on the Label Studio host (``/data/local-files/?d=``,
``/data/upload/...``), an ``http(s)://`` URL on that host (scheme, host and port equal to ``label_studio.url``'s), or
``s3://bucket/key`` with the bucket in ``label_studio.allowed_buckets`` (read with boto3 through ``storage``, the
endpoint from the environment). Anything else is refused before a connection is made; redirects are not followed;
bodies over ``max_body_bytes`` are refused while they stream, images over ``max_image_pixels`` from their header, as
``/v1/predict`` does. The token (``LABEL_STUDIO_API_KEY``, sent as ``Authorization: Token ...``) goes only to the
Label Studio host, is read from the environment when a request needs it, and is never logged or answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request

from ...model.serving import BoundVocabulary
from ...model.vocabulary import Vocabulary
from .. import storage
from .io import BodyBudget, RequestError, read_body

PREFIX = "/label-studio"
TOKEN_VAR = "LABEL_STUDIO_API_KEY"
ENTRY_ANSWERS = ("present", "absent", "can't tell")
CATEGORY_KEY = "category"  # the data field of an entries-mode task that names its category
CONFIG_LIMIT = 1_000_000  # characters of a labelling config


class LabelStudioArgs(BaseModel):
    """Where the ML backend may fetch task images from (``label_studio`` of the Serve args); unknown keys are an
    error. With no ``url``, only ``s3://`` images of ``allowed_buckets`` are fetched."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="the Label Studio server's URL, as its tasks' image URLs name it "
                                              "(http(s)://host[:port]); relative /data/... paths are fetched from "
                                              "it with the token in $LABEL_STUDIO_API_KEY")
    allowed_buckets: list[str] = Field(default_factory=list, description="S3 buckets whose s3:// task images "
                                                                         "may be read (boto3, AWS_* environment)")
    timeout_s: float = Field(30.0, gt=0, description="per image fetch")
    concurrent_fetches: int = Field(4, ge=1, description="images of one /predict request fetched at once")

    @field_validator("url")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password \
                or parts.query or parts.fragment:
            raise ValueError(f"{value!r} is not an http(s)://host[:port][/path] URL without credentials or query")
        return value.rstrip("/")

    @field_validator("allowed_buckets")
    @classmethod
    def _buckets(cls, value: list[str]) -> list[str]:
        bad = [b for b in value if not b or "/" in b or b != b.strip()]
        if bad:
            raise ValueError(f"bucket names without s3:// or slashes, got {bad}")
        return value


# ------------------------------------------------------------------------------------------ labelling configs
@dataclass(frozen=True)
class Choice:
    value: str  # as the config's <Choice value> says
    output: str  # what a result names: the choice's alias when it has one, else its value


@dataclass(frozen=True)
class LabelConfig:
    """What a labelling config asks, as this backend answers it."""

    mode: str  # "entries" or "images"
    from_name: str  # the <Choices> control's name
    to_name: str  # the <Image> it labels
    data_key: str  # the task data field holding the image URL ($key of the <Image value>)
    choices: tuple[Choice, ...]


def parse_label_config(text: object) -> LabelConfig:
    """The one ``<Choices>`` control of a labelling config and the ``<Image>`` it labels; RequestError 422 naming
    what is wrong. Document type declarations (entities) are refused unparsed."""
    if not isinstance(text, str) or not text.strip():
        raise RequestError(422, "the labelling config (label_config / schema) is missing or not a string")
    if len(text) > CONFIG_LIMIT or "<!DOCTYPE" in text.upper() or "<!ENTITY" in text.upper():
        raise RequestError(422, "the labelling config is over 1 MB or declares a document type or entities")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as e:
        raise RequestError(422, f"the labelling config is not valid XML: {e}") from None
    controls = [e for e in root.iter() if e.tag == "Choices"]
    if len(controls) != 1:
        raise RequestError(422, f"the labelling config must have exactly one <Choices> control, it has "
                                f"{len(controls)}: this backend answers the configs `sarl annotate push` writes")
    control = controls[0]
    from_name, to_name = control.get("name"), control.get("toName")
    if not from_name or not to_name:
        raise RequestError(422, "the <Choices> control needs a name and a toName")
    images = [e for e in root.iter() if e.tag == "Image" and e.get("name") == to_name]
    value = images[0].get("value", "") if images else ""
    if not value.startswith("$") or len(value) < 2:
        raise RequestError(422, f"<Choices name={from_name!r}> labels {to_name!r}, which is not an <Image> with a "
                                f"value=\"$field\" in the labelling config")
    choices = tuple(Choice(c.get("value", ""), c.get("alias") or c.get("value", ""))
                    for c in control.iter("Choice"))
    if not choices or any(not c.value for c in choices):
        raise RequestError(422, f"<Choices name={from_name!r}> needs <Choice value=...> children")
    values = {c.value.strip().casefold() for c in choices}
    if {"present", "absent"} <= values:
        unknown = sorted(values - set(ENTRY_ANSWERS))
        if unknown:
            raise RequestError(422, f"<Choices name={from_name!r}> mixes the entry answers with {unknown}")
        return LabelConfig("entries", from_name, to_name, value[1:], choices)
    if control.get("choice") != "multiple":
        raise RequestError(422, f"<Choices name={from_name!r}> is neither the entries question (present, absent, "
                                f"can't tell) nor a choice=\"multiple\" list of categories")
    return LabelConfig("images", from_name, to_name, value[1:], choices)


def served_index(vocabulary: Vocabulary, name: str) -> int | None:
    """The position of the enabled category named ``name`` (or an alias of it), else None."""
    try:
        index = vocabulary.index(name)
    except KeyError:
        return None
    return index if vocabulary.categories[index].enabled else None


def category_indices(config: LabelConfig, vocabulary: Vocabulary) -> list[int]:
    """An images-mode config's choices as positions in ``vocabulary``; RequestError 422 naming the choices it does
    not serve (an entries-mode config has none)."""
    if config.mode != "images":
        return []
    indices = [served_index(vocabulary, c.value) for c in config.choices]
    missing = [c.value for c, i in zip(config.choices, indices) if i is None]
    if missing:
        raise RequestError(422, f"<Choices name={config.from_name!r}> lists categories vocabulary version "
                                f"{vocabulary.version} does not serve: {missing}")
    return indices


# ------------------------------------------------------------------------------------------ predictions
def model_version(model_info: dict[str, str], vocabulary_version: str) -> str:
    """What Label Studio stores as a prediction's ``model_version``: the model id and the vocabulary version."""
    return f"{model_info['id']}@vocabulary-{vocabulary_version}"


def prediction(config: LabelConfig, task: dict, probs: list[float], vocabulary: Vocabulary,
               version: str) -> dict:
    """One task's prediction (``{result, score, model_version}``) from its image's scores; RequestError 422 when
    an entries-mode task names a category the vocabulary does not serve."""
    region = {"from_name": config.from_name, "to_name": config.to_name, "type": "choices"}
    if config.mode == "entries":
        name = (task.get("data") or {}).get(CATEGORY_KEY)
        index = served_index(vocabulary, name) if isinstance(name, str) else None
        if index is None:
            raise RequestError(422, f"task {task.get('id')}: data.{CATEGORY_KEY} {name!r} is not a category of "
                                    f"vocabulary version {vocabulary.version}")
        score = round(probs[index], 6)
        answer = "present" if score >= vocabulary.categories[index].threshold else "absent"
        output = next(c.output for c in config.choices if c.value.strip().casefold() == answer)
        return {"result": [{**region, "value": {"choices": [output]}}], "score": score, "model_version": version}
    ticked, margins = [], []
    for choice, index in zip(config.choices, category_indices(config, vocabulary)):
        score, threshold = round(probs[index], 6), vocabulary.categories[index].threshold
        margins.append(abs(score - threshold))
        if score >= threshold:
            ticked.append(choice.output)
    result = [{**region, "value": {"choices": ticked}}] if ticked else []
    return {"result": result, "score": round(min(margins), 6), "model_version": version}


# ------------------------------------------------------------------------------------------ images
class ImageFetcher:
    """Task image bytes from the Label Studio host or an allowed bucket, and nothing else (see the module doc)."""

    def __init__(self, args: LabelStudioArgs, max_bytes: int) -> None:
        self.args, self.max_bytes = args, max_bytes
        self.origin = _origin(args.url) if args.url else None

    def resolve(self, url: object) -> str:
        """The absolute URL to fetch for a task's image ``url``; RequestError 403 for anything not allowed."""
        if not isinstance(url, str) or not url:
            raise RequestError(422, f"the image URL must be a non-empty string, got {url!r}")
        if storage.is_s3(url):
            bucket, _, key = url[len(storage.S3_PREFIX):].partition("/")
            if bucket not in self.args.allowed_buckets or not key or key.endswith("/"):
                raise RequestError(403, f"image {url}: bucket {bucket!r} is not in label_studio.allowed_buckets "
                                        f"(or the URI names no object)")
            return url
        if url.startswith("/") and not url.startswith("//") and self.args.url:
            url = urljoin(self.args.url + "/", url)
        parts = urlsplit(url)
        if self.origin is None or parts.scheme not in ("http", "https") or parts.username or parts.password \
                or _origin(url) != self.origin:
            raise RequestError(403, f"image {url}: only the Label Studio host in label_studio.url "
                                    f"({self.args.url or 'not set'}) and s3:// URIs of label_studio.allowed_buckets "
                                    f"are fetched")
        return url

    def fetch(self, url: str, take: Callable[[int], None]) -> bytes:
        """The bytes at a :meth:`resolve`\\ d URL, counted by ``take`` as they come (a ``BodyBudget``'s); blocking."""
        if storage.is_s3(url):
            return self._fetch_s3(url, take)
        import requests

        token = os.environ.get(TOKEN_VAR)
        session = requests.Session()
        session.trust_env = False  # no proxy or .netrc from the environment: the token goes to this host only
        try:
            with session.get(url, headers={"Authorization": f"Token {token}"} if token else {}, stream=True,
                             allow_redirects=False, timeout=(5, self.args.timeout_s)) as response:
                if 300 <= response.status_code < 400:
                    raise RequestError(502, f"image {url}: Label Studio answered a redirect "
                                            f"({response.status_code}), which is not followed")
                if response.status_code in (401, 403):
                    raise RequestError(502, f"image {url}: Label Studio refused the request "
                                            f"({response.status_code}): set {TOKEN_VAR} on the replicas to a "
                                            f"token of a member of the project" + ("" if token else
                                                                                   f" ({TOKEN_VAR} is not set)"))
                if response.status_code == 404:
                    raise RequestError(404, f"image {url}: Label Studio has no such file (404)")
                if response.status_code != 200:
                    raise RequestError(502, f"image {url}: Label Studio answered {response.status_code}")
                return self._read_limited(url, response.headers.get("content-length"),
                                          response.iter_content(1 << 16), take)
        except requests.RequestException as e:
            raise RequestError(502, f"image {url}: cannot fetch it from Label Studio: {type(e).__name__}") from None
        finally:
            session.close()

    def _fetch_s3(self, url: str, take: Callable[[int], None]) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = storage.parse_s3(url)
        try:
            obj = storage.s3_client(fail_fast=True).get_object(Bucket=bucket, Key=key)
            body = obj["Body"]
            try:
                return self._read_limited(url, obj.get("ContentLength"), iter(lambda: body.read(1 << 16), b""),
                                          take)
            finally:
                body.close()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                raise RequestError(404, f"image {url} does not exist") from None
            raise RequestError(502, f"image {url}: S3 refused to read it ({code})") from None
        except BotoCoreError as e:
            raise RequestError(502, f"image {url}: cannot read it from S3: {type(e).__name__}") from None

    def _read_limited(self, url: str, declared: object, chunks: Any, take: Callable[[int], None]) -> bytes:
        size = int(declared) if str(declared or "").isdigit() else 0
        if size > self.max_bytes:
            raise RequestError(413, f"image {url} has {size} bytes, over the limit of {self.max_bytes} bytes")
        take(size)
        data = bytearray()
        for chunk in chunks:
            data += chunk
            if len(data) > self.max_bytes:
                raise RequestError(413, f"image {url} is over the limit of {self.max_bytes} bytes")
            if len(data) > size:
                take(len(data) - size)
                size = len(data)
        return bytes(data)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


# ------------------------------------------------------------------------------------------ the protocol
Decode = Callable[[bytes], Awaitable[Any]]  # image bytes -> the model's input, on the replica's decode pool
Score = Callable[[Any], Awaitable[tuple[list[float], BoundVocabulary]]]  # one input through the batching queue


class LabelStudioBackend:
    """The protocol's endpoints for one replica: ``handle(endpoint, request)`` answers ``<PREFIX>/<endpoint>``.

    ``decode`` and ``score`` are the replica's own (``Predictor``): the same decode pool, batching queue and bound
    vocabulary as ``/v1/predict``; ``bound`` gives the version served now; fetched images and request bodies
    count against the replica's ``bodies`` budget as ``/v1/predict``'s bodies do.
    """

    def __init__(self, args: LabelStudioArgs, max_body_bytes: int, bodies: BodyBudget, decode: Decode,
                 score: Score, bound: Callable[[], BoundVocabulary], model_info: dict[str, str]) -> None:
        self.args, self.max_body_bytes, self.bodies = args, max_body_bytes, bodies
        self.decode, self.score, self.bound, self.model_info = decode, score, bound, model_info
        self.fetcher = ImageFetcher(args, max_body_bytes)
        self.routes: dict[tuple[str, str], Callable[[Request], Awaitable[dict]]] = {
            ("GET", "health"): self.health, ("POST", "setup"): self.setup, ("POST", "predict"): self.predict,
            ("POST", "webhook"): self.webhook, ("GET", "versions"): self.versions, ("POST", "train"): self.train}

    async def handle(self, endpoint: str, request: Request) -> dict:
        route = self.routes.get((request.method, endpoint))
        if route is None:
            if any(name == endpoint for _, name in self.routes):
                raise RequestError(405, f"{request.method} {PREFIX}/{endpoint} is not part of the protocol")
            raise RequestError(404, f"{PREFIX}/{endpoint} is not an endpoint of Label Studio's ML backend protocol "
                                    f"served here (health, setup, predict, webhook, versions)")
        return await route(request)

    def current_version(self) -> str:
        return model_version(self.model_info, self.bound().version)

    async def health(self, request: Request) -> dict:
        return {"status": "UP", "model_class": "SARL", "model_version": self.current_version(),
                "label_studio_url": self.args.url, "token_configured": bool(os.environ.get(TOKEN_VAR))}

    async def setup(self, request: Request) -> dict:
        body = await self._json(request)
        config = parse_label_config(body.get("schema"))
        bound = self.bound()
        category_indices(config, bound.vocabulary)
        return {"model_version": model_version(self.model_info, bound.version), "mode": config.mode}

    async def versions(self, request: Request) -> dict:
        return {"versions": [self.current_version()]}

    async def webhook(self, request: Request) -> dict:
        return {"status": "ignored", "reason": "this backend does not train from Label Studio's events"}

    async def train(self, request: Request) -> dict:
        raise RequestError(422, "this backend does not train: train on a pulled manifest with `sarl train`")

    async def predict(self, request: Request) -> dict:
        body = await self._json(request)
        config = parse_label_config(body.get("label_config"))
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise RequestError(422, "'tasks' must be a list of task objects")
        category_indices(config, self.bound().vocabulary)  # a config the vocabulary cannot answer: before fetching
        gate = asyncio.Semaphore(self.args.concurrent_fetches)
        outcomes = await asyncio.gather(*(self._predict_task(config, task, gate) for task in tasks),
                                        return_exceptions=True)
        failed = [(t.get("id"), o) for t, o in zip(tasks, outcomes) if isinstance(o, BaseException)]
        unexpected = next((o for _, o in failed if not isinstance(o, RequestError)), None)
        if unexpected is not None:
            raise unexpected
        if failed:
            raise RequestError(failed[0][1].status, "; ".join(o.message if o.message.startswith("task ")
                                                              else f"task {i}: {o.message}" for i, o in failed),
                               detail=[{"task": i, "status": o.status, "error": o.message} for i, o in failed])
        return {"results": outcomes, "model_version": self.current_version()}

    async def _predict_task(self, config: LabelConfig, task: dict, gate: asyncio.Semaphore) -> dict:
        url = self.fetcher.resolve((task.get("data") or {}).get(config.data_key))
        async with gate:
            with self.bodies.hold() as take:
                data = await asyncio.to_thread(self.fetcher.fetch, url, take)
                image = await self.decode(data)
        probs, bound = await self.score(image)
        return prediction(config, task, probs, bound.vocabulary, model_version(self.model_info, bound.version))

    async def _json(self, request: Request) -> dict:
        with self.bodies.hold() as take:
            raw = await read_body(request, self.max_body_bytes, take)
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(422, "the body must be a JSON object")
        return body


__all__ = ["CATEGORY_KEY", "ENTRY_ANSWERS", "PREFIX", "TOKEN_VAR", "Choice", "ImageFetcher", "LabelConfig",
           "LabelStudioArgs", "LabelStudioBackend", "category_indices", "model_version", "parse_label_config",
           "prediction"]

