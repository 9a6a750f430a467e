"""Reading prediction requests: body size limits, the three ways to send an image, safe decoding, JSON errors.

Kept apart from the Serve deployment so every rule about bad input is plain code with plain tests:

- raw bytes (``Content-Type: image/*`` or ``application/octet-stream``), a multipart form with one file, or JSON
  ``{"image": "<base64>", "top_k": 5, "threshold": 0.3}``; anything else is 415;
- a body over ``max_body_bytes`` is 413, refused from ``Content-Length`` before reading, or while streaming;
- an image whose header claims more than ``max_pixels`` pixels is 413 before any pixel is decoded (decompression
  bombs); bytes that are not an image are 400;
- bad ``top_k`` / ``threshold`` are 422.

No URL is ever fetched: an image only comes in the request body.
"""

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from starlette.requests import Request

RAW_TYPES = ("application/octet-stream",)
JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"


class RequestError(Exception):
    """A client error: HTTP ``status`` and a message for the JSON body (``detail``: extra structured data)."""

    def __init__(self, status: int, message: str, detail: object = None) -> None:
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail

    def body(self) -> dict:
        out = {"error": self.message, "status": self.status}
        if self.detail is not None:
            out["detail"] = self.detail
        return out


@dataclass
class PredictRequest:
    """The image bytes and the options of one prediction request."""

    image: bytes
    top_k: int | None = None
    threshold: float | None = None


def check_options(top_k: object, threshold: object) -> tuple[int | None, float | None]:
    """Validated ``top_k`` (an integer >= 1) and ``threshold`` (a number in [0, 1]); RequestError 422 otherwise."""
    problems = []
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        problems.append(f"top_k must be an integer >= 1, got {top_k!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        problems.append(f"threshold must be a number in [0, 1], got {threshold!r}")
    if problems:
        raise RequestError(422, "; ".join(problems))
    return top_k, None if threshold is None else float(threshold)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) more than ``max_bytes`` without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"request body of {int(declared)} bytes is over the limit of {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise RequestError(413, f"request body is over the limit of {max_bytes} bytes")
    return bytes(body)


async def parse_predict_request(request: Request, max_bytes: int, top_k: int | None = None,
                                threshold: float | None = None) -> PredictRequest:
    """Image and options from any of the accepted body kinds; query-string options apply unless the JSON sets them."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    accepted = media_type.startswith("image/") or media_type in (*RAW_TYPES, JSON_TYPE, MULTIPART_TYPE, "")
    if not accepted:
        raise RequestError(415, f"unsupported media type {media_type!r}: send the image as raw bytes (image/* or "
                                f"application/octet-stream), a multipart form file, or JSON with base64 'image'")
    body = await read_body(request, max_bytes)
    if media_type == JSON_TYPE:
        return _from_json(body, top_k, threshold)
    if media_type == MULTIPART_TYPE:
        return PredictRequest(await _from_multipart(request, body), *check_options(top_k, threshold))
    if not body:
        raise RequestError(400, "empty request body: send an image")
    return PredictRequest(body, *check_options(top_k, threshold))


def _from_json(body: bytes, top_k: int | None, threshold: float | None) -> PredictRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(422, "JSON body must be an object with 'image' (base64) and optional top_k, threshold")
    unknown = sorted(set(data) - {"image", "top_k", "threshold"})
    if unknown:
        raise RequestError(422, f"unknown fields {unknown}; expected image, top_k, threshold")
    if not isinstance(data.get("image"), str):
        raise RequestError(422, "'image' must be a base64 string")
    try:
        image = base64.b64decode(data["image"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "'image' is not valid base64") from None
    return PredictRequest(image, *check_options(data.get("top_k", top_k), data.get("threshold", threshold)))


async def _from_multipart(request: Request, body: bytes) -> bytes:
    """The one file of a multipart form (the body was already read, so the form is parsed from a replay of it)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive=replay).form()
    except Exception as e:  # python-multipart's errors differ by version; all mean a malformed form
        raise RequestError(400, f"malformed multipart form: {e}") from None
    files = [v for v in form.values() if hasattr(v, "read")]
    if len(files) != 1:
        raise RequestError(422, f"a multipart request must carry exactly one file, got {len(files)}")
    return await files[0].read()


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image from encoded bytes; the size in the header is checked before decoding (413), bad bytes are 400."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(413, f"image of {width}x{height} pixels is over the limit of {max_pixels} pixels")
            image.load()
            return image.convert("RGB")
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(413, f"image is over the limit of {max_pixels} pixels: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise RequestError(400, f"cannot decode the image: {e}") from None
