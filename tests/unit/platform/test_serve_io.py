"""Request parsing and image decoding for Serve, without Ray: every bad input maps to its status code."""

import asyncio
import base64
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from starlette.requests import Request

from sarl.model import Category, Vocabulary
from sarl.model.serving import BoundVocabulary
from sarl.platform.serve import ServeArgs, _response, read_serve_config
from sarl.platform.serve_io import RequestError, check_options, decode_image, parse_predict_request

REPO = Path(__file__).resolve().parents[3]


def png(width: int = 20, height: int = 10) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def claiming(width: int, height: int) -> bytes:
    data = bytearray(png(4, 4))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def request(body: bytes, content_type: str | None, chunks: int = 1, declare_length: bool = True) -> Request:
    headers = [(b"content-type", content_type.encode())] if content_type else []
    if declare_length:
        headers.append((b"content-length", str(len(body)).encode()))
    size = max(1, -(-len(body) // chunks))
    parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/v1/predict", "headers": headers,
                    "query_string": b""}, receive)


def parse(body: bytes, content_type: str | None, max_bytes: int = 10_000, **kwargs):
    return asyncio.run(parse_predict_request(request(body, content_type, **kwargs), max_bytes))


def status_of(fn) -> int:
    with pytest.raises(RequestError) as info:
        fn()
    assert info.value.body()["error"]
    return info.value.status


def test_decode_image_and_its_errors():
    assert decode_image(png(), 10**6).size == (20, 10)
    assert decode_image(png(), 10**6).mode == "RGB"
    assert status_of(lambda: decode_image(b"not an image", 10**6)) == 400
    assert status_of(lambda: decode_image(png()[:40], 10**6)) == 400  # truncated
    assert status_of(lambda: decode_image(png(20, 10), 199)) == 413
    assert status_of(lambda: decode_image(claiming(100_000, 100_000), 40_000_000)) == 413
    assert status_of(lambda: decode_image(claiming(30_000, 1_000), 40_000_000)) == 400  # refused size passes, no data


def test_the_three_body_kinds_give_the_same_image():
    image = png()
    assert parse(image, "image/png").image == image
    assert parse(image, "application/octet-stream").image == image
    encoded = json.dumps({"image": base64.b64encode(image).decode(), "top_k": 3, "threshold": 0.25}).encode()
    from_json = parse(encoded, "application/json")
    assert (from_json.image, from_json.top_k, from_json.threshold) == (image, 3, 0.25)
    boundary = "b0undary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    assert parse(form, f"multipart/form-data; boundary={boundary}").image == image


@pytest.mark.parametrize("body,content_type,status", [
    (b"x" * 10_001, "image/png", 413),
    (b"{}", "text/plain", 415),
    (b"", "image/png", 400),
    (b"{not json", "application/json", 400),
    (b'{"image": "%%%"}', "application/json", 400),
    (b'["a list"]', "application/json", 422),
    (b'{"image": "aGk=", "url": "http://example.com/x.png"}', "application/json", 422),
    (b'{"image": 5}', "application/json", 422),
    (b'{"image": "aGk=", "top_k": 0}', "application/json", 422),
    (b'{"image": "aGk=", "threshold": "high"}', "application/json", 422),
    (b"--b\r\nbroken", "multipart/form-data; boundary=zzz", 400),
    (b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--b--\r\n', "multipart/form-data; boundary=b",
     422),  # a form without a file
])
def test_bad_bodies(body, content_type, status):
    assert status_of(lambda: parse(body, content_type)) == status


def test_body_limit_holds_without_content_length_too():
    assert status_of(lambda: parse(b"x" * 10_001, "image/png", chunks=5, declare_length=False)) == 413
    assert parse(b"x" * 10_000, "image/png", chunks=5, declare_length=False).image == b"x" * 10_000


def test_check_options():
    assert check_options(None, None) == (None, None)
    assert check_options(5, 1) == (5, 1.0)
    for top_k, threshold in [(0, None), (True, None), (2.5, None), (None, -0.1), (None, 1.01), (None, False)]:
        assert status_of(lambda: check_options(top_k, threshold)) == 422  # noqa: B023


def test_response_thresholds_top_k_and_disabled_categories():
    vocab = Vocabulary([Category("a", threshold=0.9), Category("b", threshold=0.1), Category("c", enabled=False),
                        Category("d", threshold=0.5)], version="7")
    bound = BoundVocabulary(vocab, (0, 1, 2, None), torch.zeros(4, 2), None, None, torch.zeros(4))
    body = _response([0.8, 0.2, 0.99, 0.6], bound, None, None, "r1")
    assert body["vocabulary_version"] == "7" and list(body["scores"]) == ["a", "d", "b"]  # best first, c disabled
    assert [(x["name"], x["zero_shot"]) for x in body["labels"]] == [("d", True), ("b", False)]
    assert [x["name"] for x in _response([0.8, 0.2, 0.99, 0.6], bound, 1, 0.0, "r1")["labels"]] == ["a"]


def test_serve_config_files_validate():
    for name in ("local.yaml", "production.yaml"):
        config = read_serve_config(REPO / "serve_configs" / name)
        ServeArgs.model_validate(config.args)
        assert config.deployment["autoscaling_config"]["min_replicas"] >= 1
        assert set(config.deployment["user_config"]) == {"max_batch_size", "batch_wait_timeout_s",
                                                         "poll_interval_s", "vocabulary_version"}
    assert ServeArgs(checkpoint="x").max_body_bytes == 10 * 1024 * 1024
    with pytest.raises(ValueError, match="extra"):
        ServeArgs.model_validate({"checkpoint": "x", "checkpoit": "y"})
