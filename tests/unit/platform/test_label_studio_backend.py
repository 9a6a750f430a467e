"""Label Studio's ML backend protocol in this process (``sarl.platform.serve.label_studio``): the labelling configs,
the image allow-list, fetching from a real HTTP server on 127.0.0.1 that plays the Label Studio host, and a
``Predictor`` replica (the class Serve wraps, without Ray) answering health, setup and predict with the scores of
its own ``/v1/predict``, never with the token."""

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import torch
from pydantic import ValidationError
from starlette.requests import Request
from test_serve_io import claiming, png
from test_serve_replica import replica

from sarl.model import Category, Vocabulary, create_model
from sarl.model.checkpoint import save_checkpoint
from sarl.platform.serve.deployment import ServeArgs
from sarl.platform.serve.io import RequestError
from sarl.platform.serve.label_studio import (
    ImageFetcher,
    LabelStudioArgs,
    category_indices,
    parse_label_config,
    prediction,
)

TOKEN = "LSTOKEN-unit-3b9e5d1c77"  # distinctive: looked for in every answer

ENTRIES = """<View>
  <Image name="photo" value="$img"/>
  <Header value="Is there a $category?"/>
  <Choices name="verdict" toName="photo" choice="single" showInLine="true">
    <Choice value="present"/><Choice value="absent"/><Choice value="can't tell"/>
  </Choices>
</View>"""

IMAGES = """<View>
  <Image name="image" value="$image"/>
  <Choices name="categories" toName="image" choice="multiple">
    <Choice value="ace"/><Choice value="King" alias="king"/>
  </Choices>
</View>"""


# ------------------------------------------------------------------------------------------ configs
def test_both_configs_are_read_from_the_xml_not_assumed():
    entries = parse_label_config(ENTRIES)
    assert (entries.mode, entries.from_name, entries.to_name, entries.data_key) == ("entries", "verdict", "photo",
                                                                                    "img")
    images = parse_label_config(IMAGES)
    assert (images.mode, images.from_name, images.to_name, images.data_key) == ("images", "categories", "image",
                                                                                 "image")
    assert [(c.value, c.output) for c in images.choices] == [("ace", "ace"), ("King", "king")]


@pytest.mark.parametrize("config, words", [
    ("<View><Image name='i' value='$i'/></View>", "exactly one <Choices>"),
    (IMAGES.replace("</View>", "<Choices name='b' toName='image'><Choice value='x'/></Choices></View>"),
     "exactly one <Choices>"),
    (IMAGES.replace('value="$image"', 'value="image"'), "not an <Image>"),
    (IMAGES.replace('toName="image"', 'toName="nothing"'), "not an <Image>"),
    (IMAGES.replace('choice="multiple"', 'choice="single"'), "neither the entries question"),
    (ENTRIES.replace("can't tell", "maybe"), "mixes the entry answers"),
    ("<View><Choices", "not valid XML"),
    ('<!DOCTYPE v [<!ENTITY a "aaaa">]><View>&a;</View>', "entities"),
    (None, "missing"),
])
def test_configs_this_backend_cannot_answer_are_refused_with_the_reason(config, words):
    with pytest.raises(RequestError) as info:
        parse_label_config(config)
    assert info.value.status == 422 and words in info.value.message


def test_a_config_is_refused_when_the_vocabulary_does_not_serve_its_choices():
    vocabulary = Vocabulary([Category("ace"), Category("king", aliases=["K"]), Category("queen", enabled=False)],
                            version="7")
    assert category_indices(parse_label_config(IMAGES), vocabulary) == [0, 1]  # names, case-insensitive
    listed = '<Choice value="joker"/><Choice value="queen"/>'
    config = parse_label_config(IMAGES.replace('<Choice value="ace"/>', listed))
    with pytest.raises(RequestError) as info:
        category_indices(config, vocabulary)
    assert info.value.status == 422 and "version 7" in info.value.message
    assert "'joker'" in info.value.message and "'queen'" in info.value.message  # disabled: not served either


def test_predictions_tick_what_is_at_or_above_each_threshold():
    vocabulary = Vocabulary([Category("ace", threshold=0.3), Category("king", threshold=0.8)], version="2")
    images = prediction(parse_label_config(IMAGES), {"id": 1}, [0.3, 0.7], vocabulary, "m@vocabulary-2")
    assert images["result"] == [{"from_name": "categories", "to_name": "image", "type": "choices",
                                 "value": {"choices": ["ace"]}}]
    assert images["score"] == 0.0 and images["model_version"] == "m@vocabulary-2"  # the smallest margin: ace's
    entries = parse_label_config(ENTRIES)
    king = prediction(entries, {"id": 2, "data": {"category": "king"}}, [0.3, 0.7], vocabulary, "v")
    assert king["result"][0]["value"] == {"choices": ["absent"]} and king["score"] == 0.7
    assert king["result"][0]["from_name"] == "verdict" and king["result"][0]["to_name"] == "photo"
    ace = prediction(entries, {"id": 3, "data": {"category": "ace"}}, [0.3, 0.7], vocabulary, "v")
    assert ace["result"][0]["value"] == {"choices": ["present"]}  # at the threshold: present
    with pytest.raises(RequestError) as info:
        prediction(entries, {"id": 4, "data": {"category": "joker"}}, [0.3, 0.7], vocabulary, "v")
    assert info.value.status == 422 and info.value.message.startswith("task 4: data.category 'joker'")


def test_label_studio_args_are_checked_and_forbid_unknown_keys():
    args = ServeArgs(checkpoint="x", label_studio={"url": "http://ls.example:8080/", "allowed_buckets": ["b"]})
    assert args.label_studio.url == "http://ls.example:8080" and ServeArgs(checkpoint="x").label_studio.url is None
    for bad in ({"url": "ftp://ls"}, {"url": "http://user:pw@ls"}, {"allowed_buckets": ["s3://b"]},
                {"urls": "http://ls"}):
        with pytest.raises(ValidationError):
            ServeArgs(checkpoint="x", label_studio=bad)


# ------------------------------------------------------------------------------------------ the allow-list
def test_only_the_label_studio_host_and_allowed_buckets_are_fetched():
    fetcher = ImageFetcher(LabelStudioArgs(url="http://ls.example:8080", allowed_buckets=["photos"]), 1000)
    assert fetcher.resolve("/data/local-files/?d=a/b.png") == "http://ls.example:8080/data/local-files/?d=a/b.png"
    assert fetcher.resolve("http://LS.example:8080/data/upload/1/x.jpg") == "http://LS.example:8080/data/upload/1/x.jpg"
    assert fetcher.resolve("s3://photos/a/b.jpg") == "s3://photos/a/b.jpg"
    for url in ("http://ls.example:8081/x.png", "https://ls.example:8080/x.png", "http://other.example:8080/x",
                "//other.example/x.png", "http://ls.example:8080@other.example/x", "http://u@ls.example:8080/x",
                "file:///etc/passwd", "s3://other/a.jpg", "s3://photos/", "s3:///a.jpg", "gs://photos/a.jpg",
                "data:image/png;base64,AAAA", "x.png", "http://169.254.169.254/latest/meta-data/"):
        with pytest.raises(RequestError) as info:
            fetcher.resolve(url)
        assert info.value.status == 403, url
    without = ImageFetcher(LabelStudioArgs(), 1000)
    with pytest.raises(RequestError) as info:
        without.resolve("/data/local-files/?d=a.png")
    assert "not set" in info.value.message


class LabelStudioHost:
    """A real HTTP server on 127.0.0.1 that serves images as Label Studio's /data/local-files/ does: only to
    ``Authorization: Token <token>``; ``/moved`` redirects to ``elsewhere`` (another server, which counts hits)."""

    def __init__(self, files: dict[str, bytes], elsewhere: str = "") -> None:
        self.files, self.elsewhere, self.headers = files, elsewhere, []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                host.headers.append(dict(self.headers))
                url = urlsplit(self.path)
                if url.path == "/moved":
                    self.send_response(302)
                    self.send_header("Location", f"{host.elsewhere}/data/local-files/?d=a.png")
                    self.end_headers()
                    return
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    self.send_response(401)
                    self.end_headers()
                    return
                name = parse_qs(url.query).get("d", [""])[0]
                if url.path != "/data/local-files/" or name not in host.files:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(host.files[name])))
                self.end_headers()
                self.wfile.write(host.files[name])

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hosts() -> Iterator[tuple[LabelStudioHost, LabelStudioHost]]:
    other = LabelStudioHost({"a.png": png()})
    ls = LabelStudioHost({"a.png": png(40, 30), "b.png": png(30, 40), "big.png": bytes(5000),
                          "bomb.png": claiming(20000, 20000)}, elsewhere=other.url)
    yield ls, other
    ls.close()
    other.close()


def test_fetching_sends_the_token_to_the_label_studio_host_only_and_follows_no_redirect(hosts, monkeypatch):
    ls, other = hosts
    fetcher = ImageFetcher(LabelStudioArgs(url=ls.url), 2000)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    taken = []
    assert fetcher.fetch(fetcher.resolve("/data/local-files/?d=a.png"), taken.append) == png(40, 30)
    assert sum(taken) == len(png(40, 30)) and ls.headers[-1]["Authorization"] == f"Token {TOKEN}"
    with pytest.raises(RequestError) as info:
        fetcher.fetch(fetcher.resolve("/moved"), taken.append)
    assert info.value.status == 502 and "redirect" in info.value.message and other.headers == []
    with pytest.raises(RequestError) as info:
        fetcher.fetch(fetcher.resolve("/data/local-files/?d=gone.png"), taken.append)
    assert info.value.status == 404 and "gone.png" in info.value.message
    with pytest.raises(RequestError) as info:
        fetcher.fetch(fetcher.resolve("/data/local-files/?d=big.png"), taken.append)
    assert info.value.status == 413 and "over the limit of 2000 bytes" in info.value.message
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "wrong")
    with pytest.raises(RequestError) as info:
        fetcher.fetch(fetcher.resolve("/data/local-files/?d=a.png"), taken.append)
    assert info.value.status == 502 and "LABEL_STUDIO_API_KEY" in info.value.message
    assert "wrong" not in info.value.message


# ------------------------------------------------------------------------------------------ a replica
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(create_model("tiny", ["ace", "king"]), tmp_path_factory.mktemp("ls") / "ckpt")


def json_request(path: str, body: dict | None = None, method: str = "POST") -> Request:
    data = json.dumps(body).encode() if body is not None else b""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]

    async def whole() -> dict:
        return {"type": "http.request", "body": data, "more_body": False}

    return Request({"type": "http", "method": method, "path": path, "headers": headers, "query_string": b"",
                    "state": {"request_id": "req-ls"}}, whole)


def image_request(data: bytes) -> Request:
    headers = [(b"content-type", b"image/png"), (b"content-length", str(len(data)).encode())]

    async def whole() -> dict:
        return {"type": "http.request", "body": data, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/v1/predict", "headers": headers,
                    "query_string": b"", "state": {"request_id": "req-1"}}, whole)


def test_a_replica_answers_the_protocol_with_its_own_scores_and_never_the_token(checkpoint, hosts, monkeypatch):
    ls, _ = hosts
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    with replica(checkpoint, monkeypatch, label_studio={"url": ls.url}, max_image_pixels=10_000_000) as predictor:
        asyncio.run(protocol_scenario(predictor, ls))  # one event loop: Serve's batching queue lives on it


async def protocol_scenario(predictor, ls: LabelStudioHost) -> None:
    async def call(endpoint: str, body: dict | None = None, method: str = "POST") -> dict:
        try:
            return await predictor.label_studio_backend(endpoint, json_request(endpoint, body, method))
        except RequestError as e:
            return e.body()

    answers = [await call("health", method="GET")]
    assert answers[0]["status"] == "UP" and answers[0]["token_configured"] is True
    version = answers[0]["model_version"]
    assert version == f"{predictor.model_info['id']}@vocabulary-{predictor.watcher.bound.version}"
    answers.append(await call("setup", {"project": "1.1", "schema": IMAGES, "access_token": "ignored"}))
    assert answers[-1] == {"model_version": version, "mode": "images"}
    answers.append(await call("setup", {"project": "1.1", "schema": IMAGES.replace("ace", "joker")}))
    assert answers[-1]["status"] == 422 and "'joker'" in answers[-1]["error"]

    tasks = [{"id": 11, "data": {"image": "/data/local-files/?d=a.png"}},
             {"id": 12, "data": {"image": f"{ls.url}/data/local-files/?d=b.png"}}]
    answers.append(await call("predict", {"tasks": tasks, "project": "1.1", "label_config": IMAGES, "params": {}}))
    results = answers[-1]["results"]
    assert len(results) == 2 and all(r["model_version"] == version for r in results)
    for result, image in zip(results, (png(40, 30), png(30, 40))):
        served = (await predictor.predict(image_request(image), None, 0.0))["scores"]
        ticked = {c for c in ("ace", "king") if served[c] >= 0.5}  # the checkpoint's thresholds
        assert set(result["result"][0]["value"]["choices"] if result["result"] else []) == ticked
        assert result["score"] == pytest.approx(min(abs(served[c] - 0.5) for c in ("ace", "king")), abs=1e-6)

    entries = [{"id": 21, "data": {"img": "/data/local-files/?d=a.png", "category": "king"}}]
    answers.append(await call("predict", {"tasks": entries, "label_config": ENTRIES}))
    served = (await predictor.predict(image_request(png(40, 30)), None, 0.0))["scores"]
    assert answers[-1]["results"][0]["score"] == served["king"]  # the same decode and model path, rounded alike

    bad = [{"id": 31, "data": {"img": "/data/local-files/?d=gone.png", "category": "ace"}},
           {"id": 32, "data": {"img": "http://169.254.169.254/latest", "category": "ace"}},
           {"id": 33, "data": {"img": "/data/local-files/?d=bomb.png", "category": "ace"}},
           {"id": 34, "data": {"img": "/data/local-files/?d=a.png", "category": "joker"}}]
    answers.append(await call("predict", {"tasks": bad, "label_config": ENTRIES}))
    detail = {d["task"]: d["status"] for d in answers[-1]["detail"]}
    assert detail == {31: 404, 32: 403, 33: 413, 34: 422}
    assert "task 31: image http://127.0.0.1" in answers[-1]["error"]
    assert predictor.bodies.held == 0  # every fetched image given back to the budget

    answers += [await call("webhook", {"action": "TASK_CREATED"}), await call("versions", method="GET")]
    assert answers[-1] == {"versions": [version]}
    answers += [await call("train", {}), await call("nothing", {}), await call("predict", method="GET")]
    assert [a["status"] for a in answers[-3:]] == [422, 404, 405]
    assert TOKEN not in json.dumps(answers)
