"""Serve's limits and checks, without Ray: full-resolution photos accepted and JPEGs decoded at reduced scale, a
replica's budget for request bodies, and the checkpoint and store checked before anything is deployed."""

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from starlette.requests import Request
from test_serve_io import claiming, encode, request, status_of

from sarl.cli import main
from sarl.model import Category, Vocabulary, create_model
from sarl.model.checkpoint import WEIGHTS_FILE, save_checkpoint
from sarl.model.data.transforms import build_transforms
from sarl.platform.aliases import publish_alias
from sarl.platform.predict import PredictConfig
from sarl.platform.serve.deployment import ServeArgs, build_app, resolve_args
from sarl.platform.serve.io import BodyBudget, RequestError, decode_image, parse_predict_request
from sarl.platform.serve.scoring import DEFAULT_MAX_PIXELS, ImageScorer
from sarl.platform.vocab_store import VocabStore

SIZE = 64  # the tiny model's input size


def photo(width: int, height: int, fmt: str = "JPEG", mode: str = "RGB", **save) -> bytes:
    """A smooth picture (gradients and a red block, as a photo is smooth next to noise), saved as ``fmt``."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1).astype(np.uint8)
    pixels[height // 4:height // 2, width // 3:width // 2] = (200, 30, 30)
    return encode(Image.fromarray(pixels).convert(mode), fmt, quality=90, **save)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(create_model("tiny", ["ace", "king", "queen"]), tmp_path_factory.mktemp("limits") / "ckpt")


# ------------------------------------------------------------------------------------------------ photo sizes
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, over 89 MP: then 413
def test_full_resolution_photos_pass_the_default_limits():
    args = ServeArgs(checkpoint="x")
    assert args.max_image_pixels == DEFAULT_MAX_PIXELS == 100_000_000 == PredictConfig("c", "i", "o").max_image_pixels
    assert args.max_body_bytes == 50 * 1024 * 1024 <= args.max_buffered_body_bytes
    # a 50 MP phone mode (8160x6120) and a 61 MP camera (9504x6336) pass the header check (the bytes here hold no
    # pixels: 400), 10001x10000 does not (413)
    for width, height in ((8160, 6120), (9504, 6336)):
        assert status_of(lambda: decode_image(claiming(width, height), args.max_image_pixels, SIZE)) == 400  # noqa: B023
    assert status_of(lambda: decode_image(claiming(10_001, 10_000), args.max_image_pixels, SIZE)) == 413
    with pytest.raises(ValueError, match="max_buffered_body_bytes .* is under max_body_bytes"):
        ServeArgs(checkpoint="x", max_body_bytes=1000, max_buffered_body_bytes=999)


def test_a_large_jpeg_decodes_at_reduced_scale_to_at_least_the_input_size():
    data = photo(1600, 1200)
    full, drafted = decode_image(data, DEFAULT_MAX_PIXELS), decode_image(data, DEFAULT_MAX_PIXELS, SIZE)
    assert full.size == (1600, 1200) and drafted.size == (200, 150) and drafted.mode == "RGB"  # 1/8: both >= 64
    assert decode_image(data, DEFAULT_MAX_PIXELS, 224).size == (400, 300)  # 1/4: 1/8 would be 150 high
    transform = build_transforms(SIZE)
    difference = (transform(full) - transform(drafted)).abs()
    assert difference.mean() < 0.01 and difference.max() < 0.2  # normalised units: about 0.3 per 255 / 4
    # orientation, grayscale and CMYK as without the draft: turned upright, then RGB
    exif = Image.Exif()
    exif[0x0112] = 6
    assert decode_image(photo(1600, 1200, exif=exif.tobytes()), DEFAULT_MAX_PIXELS, SIZE).size == (150, 200)
    for mode in ("L", "CMYK"):
        image = decode_image(photo(1600, 1200, mode=mode), DEFAULT_MAX_PIXELS, SIZE)
        assert image.size == (200, 150) and image.mode == "RGB"
    png = decode_image(photo(1600, 1200, "PNG"), DEFAULT_MAX_PIXELS, SIZE)  # only JPEG has a reduced-scale decode
    assert png.size == (1600, 1200) and png.mode == "RGB"


def test_a_jpeg_under_twice_the_input_size_decodes_exactly_as_before(checkpoint):
    scorer = ImageScorer(str(checkpoint), "cpu")
    bound = scorer.bind(scorer.model.vocabulary)
    for width, height in ((100, 80), (127, 300), (SIZE * 2 - 1, SIZE * 2 - 1)):
        data = photo(width, height)
        before = decode_image(data, DEFAULT_MAX_PIXELS)
        assert np.array_equal(np.asarray(decode_image(data, DEFAULT_MAX_PIXELS, SIZE)), np.asarray(before))
        assert torch.equal(scorer.preprocess(data), scorer.transform(before))  # so the scores are the same
    # a large one: the scorer decodes it at reduced scale, and its scores move by little
    data = photo(1600, 1200)
    assert torch.equal(scorer.preprocess(data), scorer.transform(decode_image(data, DEFAULT_MAX_PIXELS, SIZE)))
    full = scorer.score(bound, [scorer.transform(decode_image(data, DEFAULT_MAX_PIXELS))])[0]
    assert np.abs(np.array(scorer.score(bound, [scorer.preprocess(data)])[0]) - full).max() < 0.01


def test_the_pixel_limit_is_read_from_the_header_before_any_draft_or_decode(monkeypatch):
    drafts = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, *a: drafts.append(self.size) or real(self, *a))
    data = photo(2000, 1000)
    assert status_of(lambda: decode_image(data, 1_999_999, SIZE)) == 413
    assert drafts == []
    assert decode_image(data, 2_000_000, SIZE).size == (250, 125) and drafts == [(2000, 1000)]


# ------------------------------------------------------------------------------------------------ body budget
def test_the_body_budget_bounds_what_all_requests_hold_together():
    budget = BodyBudget(100)

    async def parse(body: bytes, take, **kwargs):
        return await parse_predict_request(request(body, "image/jpeg", **kwargs), 1000, take=take)

    async def scenario() -> None:
        with budget.hold() as first:
            assert (await parse(b"a" * 60, first)).image == b"a" * 60
            assert budget.held == 60  # held until its request is done with the bytes
            for kwargs in ({}, {"chunks": 5, "declare_length": False}):  # refused from Content-Length, or streaming
                with budget.hold() as second:
                    with pytest.raises(RequestError) as info:
                        await parse(b"b" * 50, second, **kwargs)
                    assert info.value.status == 503 and "retry" in info.value.message
                assert budget.held == 60  # what the refused one took is given back
            with budget.hold() as third:
                assert (await parse(b"c" * 40, third, chunks=4, declare_length=False)).image == b"c" * 40
                assert budget.held == 100
        assert budget.held == 0

    asyncio.run(scenario())


def test_an_answer_before_the_body_is_read_waits_until_the_rest_is_read_and_dropped(monkeypatch):
    """A 413 (415, 503, ...) answered before the body is read: the rest is read first (up to ``DRAIN_BYTES``), so a
    client that writes all of it before reading, with ``Connection: close``, is not reset (see ErrorsAndMetrics)."""
    from fastapi import FastAPI

    from sarl.platform.serve import deployment as serving

    app = FastAPI()
    app.add_middleware(serving.ErrorsAndMetrics)
    app.exception_handler(RequestError)(serving._request_error)
    monkeypatch.setattr(serving, "DRAIN_BYTES", 1_500_000)

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict:
        return {"bytes": len((await parse_predict_request(request, 1_000_000)).image)}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    def call(method: str, path: str, chunks: int, chunked: bool = False) -> tuple[list[str], int]:
        """The order of what the app read (``chunk``) and sent, and the status, for ``chunks`` of 100 kB."""
        events, left = [], chunks
        headers = [(b"content-type", b"image/jpeg")] + (
            [(b"transfer-encoding", b"chunked")] if chunked else [(b"content-length", str(chunks * 100_000).encode())]
            if chunks else [])

        async def receive() -> dict:
            nonlocal left
            assert left > 0, "read past the end of the body"
            left -= 1
            events.append("chunk")
            return {"type": "http.request", "body": b"\0" * 100_000, "more_body": left > 0}

        async def send(message: dict) -> None:
            events.append(message["type"])
            if message["type"] == "http.response.start":
                status.append(message["status"])

        status: list[int] = []
        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "headers": headers,
                 "query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8000)}
        asyncio.run(app(scope, receive, send))
        return events, status[0]

    answer = ["http.response.start", "http.response.body"]
    assert call("POST", "/v1/predict", 12) == (["chunk"] * 12 + answer, 413)  # refused from Content-Length, read
    assert call("POST", "/v1/predict", 20, chunked=True) == (["chunk"] * 20 + answer, 413)  # 11 read, 9 dropped
    assert call("POST", "/v1/predict", 30) == (["chunk"] * 16 + answer, 413)  # 1.6 MB > DRAIN_BYTES: no further
    assert call("POST", "/v1/predict", 5) == (["chunk"] * 5 + answer, 200)  # read by the route: nothing to drop
    assert call("GET", "/healthz", 0) == (answer, 200)  # no body: not a single read (in Serve, a call to the proxy)


# ------------------------------------------------------------------------------------------------ checks
def test_the_app_builder_refuses_a_missing_checkpoint_or_store(checkpoint, tmp_path, monkeypatch):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(FileNotFoundError, match=f"^checkpoint {missing} does not exist$"):
        build_app({"checkpoint": str(missing)})
    partial = tmp_path / "partial"
    shutil.copytree(checkpoint, partial)
    (partial / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"checkpoint {partial} is not a SARL checkpoint \(no weights.pt\)"):
        build_app(ServeArgs(checkpoint=str(partial)))
    store = tmp_path / "store"
    with pytest.raises(FileNotFoundError, match=f"vocabulary store {store} does not exist"):
        build_app({"checkpoint": str(checkpoint), "vocab_store": str(store)})
    alias = tmp_path / "run" / "aliases" / "best.json"
    with pytest.raises(FileNotFoundError, match=f"alias {alias} does not exist"):
        build_app({"checkpoint": str(alias)})
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    publish_alias(str(tmp_path / "run"), "best", str(moved), "run:epoch-1")
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError, match=f"checkpoint {moved} \\(named by the alias {alias}\\) does not exist"):
        build_app({"checkpoint": str(alias)})
    # what is there passes, relative paths made absolute against the directory the app is built from
    VocabStore(store).push(Vocabulary([Category("ace")], version="1"))
    monkeypatch.chdir(tmp_path)
    args = resolve_args({"checkpoint": str(checkpoint), "vocab_store": "store"})
    assert args.vocab_store == str(store) and build_app(args) is not None


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint", "{tmp}/no/such/dir"], "checkpoint {tmp}/no/such/dir does not exist"),
    (["--checkpoint", "{ckpt}", "--vocab-store", "{tmp}/stor"],
     "vocabulary store {tmp}/stor does not exist (`sarl vocab push FILE --store {tmp}/stor` creates it)"),
    (["--checkpoint", "{tmp}/runs/a/aliases/best.json"], "alias {tmp}/runs/a/aliases/best.json does not exist"),
    (["--config", "{tmp}/serve.yaml"], "configuration error: max_body_byte: Extra inputs are not permitted"),
])
def test_sarl_serve_refuses_them_in_one_line_before_ray_starts(checkpoint, tmp_path, capsys, monkeypatch, flags,
                                                               message):
    import ray

    from sarl.platform import cluster

    (tmp_path / "serve.yaml").write_text(
        "applications:\n  - name: sarl\n    import_path: sarl.platform.serve:build_app\n"
        f"    args: {{checkpoint: {checkpoint}, max_body_byte: 5}}\n")
    started = ray.is_initialized()  # False, unless an earlier test of this session connected
    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    argv = [f.format(tmp=tmp_path, ckpt=checkpoint) for f in flags]
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"sarl serve: {message.format(tmp=tmp_path, ckpt=checkpoint)}\n"
    assert ray.is_initialized() == started
