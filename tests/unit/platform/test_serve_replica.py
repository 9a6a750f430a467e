"""A ``Predictor`` replica in this process, without Ray (the class Serve wraps, on the tiny checkpoint): readiness
probes coalesced, and the body budget on the prediction route."""

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from starlette.requests import Request
from test_serve_io import png

from sarl.model import create_model
from sarl.model.checkpoint import save_checkpoint
from sarl.platform.serve import deployment as serving
from sarl.platform.serve.io import RequestError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(create_model("tiny", ["ace", "king"]), tmp_path_factory.mktemp("replica") / "ckpt")


@contextlib.contextmanager
def replica(checkpoint: Path, monkeypatch, **args) -> Iterator:
    """The deployment's own class (under Serve's ingress wrapper) built as a replica builds it."""
    context = SimpleNamespace(replica_id=SimpleNamespace(unique_id="replica-1"),
                              _deployment_config=SimpleNamespace(max_ongoing_requests=64))  # what serve.batch reads
    monkeypatch.setattr(serving.serve, "get_replica_context", lambda: context)
    cls = serving.Predictor.func_or_class.__bases__[0]
    assert cls.__name__ == "Predictor"
    predictor = cls(serving.ServeArgs(checkpoint=str(checkpoint), device="cpu", decode_threads=1, **args))
    try:
        yield predictor
    finally:
        predictor._stop.set()
        predictor._thread.join()
        predictor.forward_pool.shutdown()
        predictor.decode_pool.shutdown()
        # serve.batch keeps one queue per decorated method, made on first use and bound to that event loop (in
        # Serve, one per replica process). Dropped here, so that the next in-process replica's loop gets its own
        # (an old queue never answers on a new loop) and the class still pickles (build_app ships it to Ray).
        cls._score_batch.set_max_batch_size.__self__._queue = None


def http_request(body: bytes = b"", receive=None) -> Request:
    headers = [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())]

    async def whole() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/v1/predict", "headers": headers,
                    "query_string": b"", "state": {"request_id": "req-1"}}, receive or whole)


def counted_forwards(predictor, seconds: float = 0.2, error: Exception | None = None) -> list[int]:
    """Every forward of ``predictor`` from now on, each lasting ``seconds`` (so that callers overlap)."""
    calls: list[int] = []
    score = predictor.scorer.score

    def slow(bound, images):
        calls.append(len(images))
        time.sleep(seconds)
        if error is not None:
            raise error
        return score(bound, images)

    predictor.scorer.score = slow
    return calls


def test_concurrent_readiness_probes_share_one_forward(checkpoint, monkeypatch):
    with replica(checkpoint, monkeypatch) as predictor:
        async def probes(n: int) -> list:
            return await asyncio.gather(*(predictor.readyz(http_request()) for _ in range(n)),
                                        predictor.check_health(), return_exceptions=True)

        predictor.health.last_ok -= 60  # idle for a minute: readyz and check_health probe the model
        calls = counted_forwards(predictor)
        answers = asyncio.run(probes(8))
        assert calls == [1]  # one one-image forward for 8 readiness probes and a health check
        assert all(a["status"] == "ready" for a in answers[:8]) and answers[8] is None
        asyncio.run(probes(8))
        assert calls == [1]  # the model answered just now: no probe at all

        predictor.health.last_ok -= 60
        calls = counted_forwards(predictor, error=RuntimeError("CUDA error: an illegal memory access"))
        answers = asyncio.run(probes(8))
        assert calls == [1]  # a failed probe is shared too: every caller is told, none starts another
        assert all(a.status_code == 503 for a in answers[:8]) and isinstance(answers[8], RuntimeError)


def test_the_prediction_route_holds_bodies_within_the_replica_budget(checkpoint, monkeypatch):
    image = png(40, 30)
    with replica(checkpoint, monkeypatch, max_body_bytes=len(image),
                 max_buffered_body_bytes=len(image) + 100) as predictor:
        async def scenario() -> None:
            arrived = asyncio.Event()

            async def slow_upload() -> dict:  # the first client's body is still on its way
                await arrived.wait()
                return {"type": "http.request", "body": image, "more_body": False}

            first = asyncio.ensure_future(predictor.predict(http_request(image, slow_upload), None, None))
            await asyncio.sleep(0.05)
            assert predictor.bodies.held == len(image)  # counted from its Content-Length
            with pytest.raises(RequestError) as info:
                await predictor.predict(http_request(image), None, None)
            assert info.value.status == 503
            arrived.set()
            assert set((await first)["scores"]) == {"ace", "king"}
            assert predictor.bodies.held == 0  # given back once decoded: the batch waits without the bytes
            assert set((await predictor.predict(http_request(image), None, None))["scores"]) == {"ace", "king"}

        asyncio.run(scenario())
