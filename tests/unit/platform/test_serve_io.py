"""Request parsing and image decoding for Serve, without Ray: every bad input maps to its status code."""

import asyncio
import base64
import io
import json
import struct
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features
from starlette.requests import Request

from sarl.model import Category, Vocabulary
from sarl.model.serving import BoundVocabulary
from sarl.platform.serve.deployment import ServeArgs, _response, read_serve_config
from sarl.platform.serve.io import RequestError, check_options, decode_image, parse_predict_request

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


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def noise(height: int, width: int, *channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, *channels), dtype=np.uint8)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def zeros_png(side: int) -> bytes:
    """A real 1-bit all-black PNG: 9000x9000 is 81 million pixels in about 10 kB (a decompression bomb)."""
    rows = (b"\0" * (1 + -(-side // 8))) * side  # each row: filter type 0, then side bits
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int32)


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255.0
    return colour * a + 255 * (1 - a)


def same(expected, tolerance: int = 0):
    """A check that the decoded image is RGB and equals ``expected`` (an array, or a function of the source bytes)."""
    def check(result: Image.Image, data: bytes) -> None:
        want = np.asarray(expected(data) if callable(expected) else expected, dtype=np.float64)
        if want.ndim == 2:
            want = np.repeat(want[..., None], 3, axis=2)
        assert result.mode == "RGB" and result.size == (want.shape[1], want.shape[0])
        assert np.abs(rgb(result) - want).max() <= tolerance
    return check


GRADIENT_16 = np.round(np.linspace(0, 65535, 64 * 64)).astype(np.uint16).reshape(64, 64)  # 0 ... 65535


def sixteen_bits(result: Image.Image, _: bytes) -> None:
    """16-bit values scaled to 8 bits: round(v / 257) or v >> 8, within 1; 65535 is 255 and nothing saturates."""
    out = rgb(result)[..., 0]
    assert result.mode == "RGB" and out.shape == GRADIENT_16.shape
    assert np.abs(out - np.round(GRADIENT_16 / 257)).max() <= 1 and np.abs(out - (GRADIENT_16 >> 8)).max() <= 1
    assert out.max() == 255 and out.min() == 0 and len(np.unique(out)) == 256


def upright(orientation: int):
    """A 40x20 JPEG (green top-left square on grey) with an EXIF orientation: decoded turned to 20x40."""
    source = np.full((20, 40, 3), 128, np.uint8)
    source[:10, :10] = (0, 200, 0)
    image = Image.fromarray(source)
    exif = Image.Exif()
    exif[0x0112] = orientation

    def check(result: Image.Image, _: bytes) -> None:
        stored = rgb(Image.open(io.BytesIO(encode(image, "JPEG", quality=95))))  # the same pixels without EXIF
        out = rgb(result)
        assert result.size == (20, 40)  # width, height
        assert np.array_equal(out, np.rot90(stored, k=-1 if orientation == 6 else 1))  # 6: clockwise, 8: counter
        green = (15, 5) if orientation == 6 else (5, 35)  # the top-left corner went top-right (6) / bottom-left (8)
        assert np.abs(out[green[1], green[0]] - (0, 200, 0)).max() < 30
        assert np.abs(out[20, 10] - 128).max() < 30
    return lambda: encode(image, "JPEG", quality=95, exif=exif.tobytes()), 10**6, check


RGB_NOISE = noise(16, 24, 3)
# alpha 0 (a fully transparent pixel, whatever its colour, must come out white), 128, 255 and 40
RGBA = np.dstack([noise(8, 8, 3, seed=1), np.tile(np.array([0, 128, 255, 40], np.uint8), 16).reshape(8, 8)])
LA = np.dstack([noise(8, 8, seed=2), np.tile(np.array([0, 255, 77, 200], np.uint8), 16).reshape(8, 8)])
PALETTE = [(0, 0, 0), (255, 0, 0), (0, 128, 255), (10, 200, 30)]
INDICES = np.arange(64, dtype=np.uint8).reshape(8, 8) % 4


def palette(transparent_index: int | None = None) -> bytes:
    image = Image.frombytes("P", (8, 8), INDICES.tobytes())
    image.putpalette([c for colour in PALETTE for c in colour])
    return encode(image, "PNG", **({} if transparent_index is None else {"transparency": transparent_index}))


def animated_gif() -> bytes:
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    return data


def two_page_tiff() -> bytes:
    """The first page is 10x10, the second 100x100: only the first counts against the limit (and is decoded)."""
    first = Image.fromarray(noise(10, 10, 3, seed=3))
    data = encode(first, "TIFF", save_all=True, append_images=[Image.new("RGB", (100, 100))])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    return data


def truncated(data: bytes) -> bytes:
    return data[:len(data) // 2]


def corrupt_pixels(png_data: bytes) -> bytes:
    start = png_data.index(b"IDAT") + 20  # past the zlib header, inside the compressed pixels
    return png_data[:start] + bytes(b ^ 0x55 for b in png_data[start:start + 40]) + png_data[start + 40:]


# case -> (the image bytes, max_pixels, the status of the RequestError or a check of the decoded image);
# every image is made here, with PIL and numpy.
CORPUS = {
    "zero bytes": (lambda: b"", 10**6, 400),
    "text named .jpg": (lambda: b"just some text in a file called photo.jpg\n" * 20, 10**6, 400),
    "text that starts like a GIF": (lambda: b"GIF89a? no: just some text\n" * 20, 10**6, 400),
    "truncated JPEG": (lambda: truncated(encode(Image.fromarray(RGB_NOISE), "JPEG")), 10**6, 400),
    "truncated progressive JPEG": (lambda: truncated(encode(Image.fromarray(RGB_NOISE), "JPEG", progressive=True)),
                                   10**6, 400),
    "JPEG without its last byte": (lambda: encode(Image.fromarray(RGB_NOISE), "JPEG")[:-1], 10**6, 400),
    "truncated PNG": (lambda: truncated(encode(Image.fromarray(RGB_NOISE), "PNG")), 10**6, 400),
    "PNG with corrupt pixel data": (lambda: corrupt_pixels(encode(Image.fromarray(RGB_NOISE), "PNG")), 10**6, 400),
    "PNG of 0x10 pixels": (lambda: claiming(0, 10), 10**6, 400),
    "EPS (never handed to Ghostscript)": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n",
                                          10**6, 400),
    "PNG header claiming 100000x100000": (lambda: claiming(100_000, 100_000), 40_000_000, 413),
    "PNG header claiming 10000x10000": (lambda: claiming(10_000, 10_000), 40_000_000, 413),  # PIL only warns
    "PNG bomb: 9000x9000 in 10 kB": (lambda: zeros_png(9000), 40_000_000, 413),
    "RGB PNG": (lambda: encode(Image.fromarray(RGB_NOISE), "PNG"), 10**6, same(RGB_NOISE)),
    "RGB BMP": (lambda: encode(Image.fromarray(RGB_NOISE), "BMP"), 10**6, same(RGB_NOISE)),
    "grayscale PNG": (lambda: encode(Image.fromarray(RGB_NOISE[..., 0]), "PNG"), 10**6, same(RGB_NOISE[..., 0])),
    "1-bit PNG": (lambda: encode(Image.fromarray(RGB_NOISE[..., 0] > 127), "PNG"), 10**6,
                  same((RGB_NOISE[..., 0] > 127) * 255)),
    "CMYK JPEG": (lambda: encode(Image.fromarray(RGB_NOISE).convert("CMYK"), "JPEG"), 10**6,
                  same(lambda data: rgb(Image.open(io.BytesIO(data))))),  # PIL's own conversion of the same file
    "CMYK JPEG, solid cyan": (lambda: encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG"), 10**6,
                              same(np.full((16, 16, 3), (0, 255, 255)), tolerance=4)),
    "16-bit grayscale PNG (I;16)": (lambda: encode(Image.fromarray(GRADIENT_16), "PNG"), 10**6, sixteen_bits),
    "16-bit big-endian TIFF (I;16B)": (lambda: encode(Image.fromarray(GRADIENT_16.astype(">u2")), "TIFF"), 10**6,
                                       sixteen_bits),
    "32-bit integer TIFF of 16-bit values (I)": (lambda: encode(Image.fromarray(GRADIENT_16.astype(np.int32)),
                                                                "TIFF"), 10**6, sixteen_bits),
    "RGBA PNG over white": (lambda: encode(Image.fromarray(RGBA), "PNG"), 10**6,
                            same(over_white(RGBA[..., :3], RGBA[..., 3]), tolerance=1)),
    "LA PNG over white": (lambda: encode(Image.fromarray(LA), "PNG"), 10**6,
                          same(over_white(LA[..., :1], LA[..., 1]), tolerance=1)),
    "palette PNG": (lambda: palette(), 10**6, same(np.array(PALETTE)[INDICES])),
    "palette PNG with a transparent index": (lambda: palette(transparent_index=1), 10**6,
                                             same(np.where(INDICES[..., None] == 1, 255, np.array(PALETTE)[INDICES]))),
    "EXIF orientation 6 JPEG": upright(6),
    "EXIF orientation 8 JPEG": upright(8),
    "JPEG with unreadable EXIF": (lambda: encode(Image.fromarray(RGB_NOISE), "JPEG", exif=b"Exif\0\0garbage" * 3),
                                  10**6, same(lambda data: rgb(Image.open(io.BytesIO(data))))),
    "animated GIF: the first frame": (animated_gif, 10**6, same(np.full((8, 8, 3), (255, 0, 0)))),
    "two-page TIFF, the second over the limit": (two_page_tiff, 1_000, same(noise(10, 10, 3, seed=3))),
    "WebP": (lambda: encode(Image.fromarray(RGB_NOISE), "WEBP", lossless=True), 10**6, same(RGB_NOISE)),
    "WebP with alpha": (lambda: encode(Image.fromarray(RGBA), "WEBP", lossless=True, exact=True), 10**6,
                        same(over_white(RGBA[..., :3], RGBA[..., 3]), tolerance=1)),
}


@pytest.mark.parametrize("case", list(CORPUS))
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, on 10000x10000: then 413
def test_decode_image_corpus(case):
    make, max_pixels, expected = CORPUS[case]
    if case.startswith("WebP") and not features.check("webp"):
        pytest.skip("this PIL has no WebP support")
    data = make()
    if isinstance(expected, int):
        assert status_of(lambda: decode_image(data, max_pixels)) == expected
    else:
        expected(decode_image(data, max_pixels), data)


def test_a_decompression_bomb_is_refused_from_its_header(monkeypatch):
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    assert np.array_equal(rgb(decode_image(zeros_png(300), 10**6)), np.zeros((300, 300, 3)))  # a real PNG
    assert set(decoded) == {(300, 300)}  # the spy sees decoding
    bomb = zeros_png(9000)
    assert len(bomb) < 50_000
    assert status_of(lambda: decode_image(bomb, 40_000_000)) == 413
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the limit is decode_image's own, not PIL's
    assert status_of(lambda: decode_image(bomb, 40_000_000)) == 413
    assert set(decoded) == {(300, 300)}  # the bomb's pixels were never decoded


def test_decode_image_changes_no_global_setting():
    import sarl.platform.serve.deployment  # noqa: F401  everything the deployment imports: none may set it
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # else truncated images decode half grey instead of a 400
    filters, limit = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    decode_image(png(), 10**6)
    status_of(lambda: decode_image(claiming(100_000, 100_000), 40_000_000))
    assert (warnings.filters, Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (filters, limit, False)


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
    model = {"id": "run:epoch-3", "digest": "sha256:00"}
    body = _response([0.8, 0.2, 0.99, 0.6], bound, None, None, "r1", model, "req-1")
    assert body["vocabulary_version"] == "7" and list(body["scores"]) == ["a", "d", "b"]  # best first, c disabled
    assert body["model"] == model and body["request_id"] == "req-1" and body["replica"] == "r1"
    assert [(x["name"], x["zero_shot"]) for x in body["labels"]] == [("d", True), ("b", False)]
    assert [x["name"] for x in _response([0.8, 0.2, 0.99, 0.6], bound, 1, 0.0, "r1", model, "r")["labels"]] == ["a"]


def test_serve_config_files_validate():
    for name in ("local.yaml", "production.yaml"):
        config = read_serve_config(REPO / "serve_configs" / name)
        ServeArgs.model_validate(config.args)
        assert config.deployment["autoscaling_config"]["min_replicas"] >= 1
        assert config.proxy_location in ("HeadOnly", "EveryNode")
        assert set(config.deployment["user_config"]) == {"max_batch_size", "batch_wait_timeout_s",
                                                         "poll_interval_s", "vocabulary_version"}
    assert ServeArgs(checkpoint="x").max_body_bytes == 50 * 1024 * 1024
    for name in ("local.yaml", "production.yaml"):  # the memory a replica asks for holds its body budget twice
        config = read_serve_config(REPO / "serve_configs" / name)
        args = ServeArgs.model_validate(config.args)
        assert config.deployment["ray_actor_options"]["memory"] >= 2 * args.max_buffered_body_bytes + 2**30
        # a proxy holds the bodies of the requests queued there: a bounded queue, at most what replicas take at once
        assert 0 < config.deployment["max_queued_requests"] <= config.deployment["max_ongoing_requests"]
    with pytest.raises(ValueError, match="extra"):
        ServeArgs.model_validate({"checkpoint": "x", "checkpoit": "y"})


def test_unexpected_errors_become_json_with_the_request_id() -> None:
    """The deployment's middleware and handlers on an app with routes that fail as a batch can; its metrics."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.testclient import TestClient

    from sarl.platform.serve import deployment as serving

    app = FastAPI()
    app.add_middleware(serving.ErrorsAndMetrics)
    app.exception_handler(RequestError)(serving._request_error)
    app.exception_handler(404)(serving._http_error)
    app.exception_handler(RequestValidationError)(serving._validation_error)
    counted: list[tuple[int, str]] = []
    app.state.metrics = SimpleNamespace(request=lambda status, reason: counted.append((status, reason)))

    @app.post("/v1/predict")
    async def predict(kind: str, request: Request) -> dict:
        if kind == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if kind == "bad":
            raise RequestError(400, "cannot decode the image")
        if kind == "busy":
            raise RequestError(503, "this replica holds its limit of bytes of request bodies; retry shortly")
        if kind == "ok":
            return {"request_id": request.state.request_id}
        raise RuntimeError("secret internal detail s3://bucket/key")

    client = TestClient(app, raise_server_exceptions=False)
    ok = client.post("/v1/predict", params={"kind": "ok"}, headers={"X-Request-ID": "r0"})
    assert ok.status_code == 200 and ok.json() == {"request_id": "r0"}  # request.state.request_id, set before
    busy = client.post("/v1/predict", params={"kind": "busy"})
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and busy.json()["reason"] == "unavailable"
    missing = client.get("/nowhere", headers={"X-Request-ID": "r9"})
    assert missing.status_code == 404 and missing.json()["request_id"] == "r9"
    crash = client.post("/v1/predict", params={"kind": "crash"}, headers={"X-Request-ID": "abc"})
    assert crash.status_code == 500
    assert crash.json() == {"error": crash.json()["error"], "status": 500, "reason": "internal", "request_id": "abc"}
    assert "secret" not in crash.text and "s3://" not in crash.text
    oom = client.post("/v1/predict", params={"kind": "oom"})
    assert oom.status_code == 503 and oom.json()["reason"] == "out_of_memory" and len(oom.json()["request_id"]) == 32
    bad = client.post("/v1/predict", params={"kind": "bad"}, headers={"X-Request-ID": "r2"})
    assert bad.status_code == 400 and bad.json()["reason"] == "bad_request" and bad.json()["request_id"] == "r2"
    invalid = client.post("/v1/predict")  # no kind: FastAPI's validation, answered by the exception handler
    assert invalid.status_code == 422
    # prediction requests only (not the 404), each with its status and reason
    assert counted == [(200, "ok"), (503, "unavailable"), (500, "internal"), (503, "out_of_memory"),
                       (400, "bad_request"), (422, "invalid_request")]
