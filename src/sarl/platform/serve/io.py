"""Reading prediction requests: body size limits, the three ways to send an image, safe decoding, JSON errors.

Kept apart from the Serve deployment so every rule about bad input is plain code with plain tests:

- raw bytes (``Content-Type: image/*`` or ``application/octet-stream``), a multipart form with one file, or JSON
  ``{"image": "<base64>", "top_k": 5, "threshold": 0.3}``; anything else is 415;
- a body over ``max_body_bytes`` is 413, refused from ``Content-Length`` before reading, or while streaming;
- a body that would take what a replica holds of all its requests' bodies over its budget (:class:`BodyBudget`)
  is 503 (retry), refused from ``Content-Length`` before reading, or while streaming;
- an image whose header claims more than ``max_pixels`` pixels is 413 before any pixel is decoded (decompression
  bombs); bytes that are not an image are 400;
- bad ``top_k`` / ``threshold`` are 422.

No URL is ever fetched: an image only comes in the request body.

Images (:func:`decode_image`): JPEG, MPO, PNG, GIF, WebP, BMP, TIFF and AVIF (where PIL has the codec); any other
format (EPS, which would run Ghostscript, among them) is 400. Every image becomes 8-bit RGB, turned upright first by
its EXIF orientation (ignored if the EXIF data is unreadable); only the first frame of an animated or multi-page image
is decoded, and only its size counts. Converted: grayscale, 1-bit, palette and CMYK by PIL; 16-bit grayscale
(``I;16``, and ``I``, read as 16-bit values) scaled to 8 bits as round(v / 257); transparency (alpha channel, palette
or ``tRNS`` transparency) composited over white. Refused: empty or non-image bytes, truncated or corrupt data, and
colour spaces PIL cannot turn into RGB are 400; over ``max_pixels`` is 413, from the header, before decoding. Truncated
images are only caught while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its default, False: nothing may set it.
Given the model's input ``size``, a JPEG (or MPO) is decoded at reduced scale (``Image.draft``: libjpeg's 1/2, 1/4 or
1/8 DCT scaling, the largest that leaves both sides at least ``size``), so a 50 MP phone photo costs what a 1 MP one
does, in time and memory; an image under twice ``size`` on its shorter side decodes exactly as without it. Other
formats decode at full size: 8 bytes a pixel at the peak, 16 with transparency (measured with PIL 12).
"""

import base64
import binascii
import contextlib
import io
import json
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.requests import Request

RAW_TYPES = ("application/octet-stream",)
JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"

Image.init()  # registers every plugin once, at import, so that the list below names only formats this PIL opens
IMAGE_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF") if f in Image.OPEN)
# what PIL raises on malformed files; some plugins also let IndexError, KeyError or ZeroDivisionError out of bad headers
DECODER_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
                  KeyError, ZeroDivisionError)
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


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


class BodyBudget:
    """What one replica holds of request bodies, all its requests together, is at most ``limit`` bytes.

    ``max_ongoing_requests`` x ``max_body_bytes`` is no bound a replica can live with (128 x 50 MB); this is. A body is
    counted from its ``Content-Length`` before it is read (else as it streams in) until its request's :meth:`hold`
    ends; one that would take the total over ``limit`` is refused with 503, which a client retries, rather than
    buffered. Safe from any thread.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self) -> Iterator[Callable[[int], None]]:
        """``take(n)``: ``n`` more bytes for this request, RequestError 503 when over; all given back on exit."""
        taken = 0

        def take(n: int) -> None:
            nonlocal taken
            with self._lock:
                if self.held + n > self.limit:
                    raise RequestError(503, f"this replica holds its limit of {self.limit} bytes of request bodies; "
                                            f"retry shortly")
                self.held += n
            taken += n

        try:
            yield take
        finally:
            with self._lock:
                self.held -= taken


async def read_body(request: Request, max_bytes: int, take: Callable[[int], None] | None = None) -> bytes:
    """The request body, refusing (413) more than ``max_bytes`` without reading it all; ``take`` (a
    :meth:`BodyBudget.hold`'s) counts its bytes, from ``Content-Length`` before any is read."""
    declared = request.headers.get("content-length")
    counted = int(declared) if declared is not None and declared.isdigit() else 0
    if counted > max_bytes:
        raise RequestError(413, f"request body of {counted} bytes is over the limit of {max_bytes} bytes")
    take = take or (lambda n: None)
    take(counted)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise RequestError(413, f"request body is over the limit of {max_bytes} bytes")
        if len(body) > counted:  # no (or a wrong) Content-Length: counted as it comes
            take(len(body) - counted)
            counted = len(body)
    return bytes(body)


async def parse_predict_request(request: Request, max_bytes: int, top_k: int | None = None,
                                threshold: float | None = None,
                                take: Callable[[int], None] | None = None) -> PredictRequest:
    """Image and options from any of the accepted body kinds; query-string options apply unless the JSON sets them.
    ``take``: counts the body against a :class:`BodyBudget` (see :func:`read_body`)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    accepted = media_type.startswith("image/") or media_type in (*RAW_TYPES, JSON_TYPE, MULTIPART_TYPE, "")
    if not accepted:
        raise RequestError(415, f"unsupported media type {media_type!r}: send the image as raw bytes (image/* or "
                                f"application/octet-stream), a multipart form file, or JSON with base64 'image'")
    body = await read_body(request, max_bytes, take)
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


def decode_image(data: bytes, max_pixels: int, size: int | None = None) -> Image.Image:
    """An RGB image from encoded bytes (see "Images" above); over ``max_pixels`` is 413 from the header, bad bytes 400.
    ``size``: the model's input size; a JPEG is decoded at the smallest DCT scale whose sides are both at least it.

    Safe in worker threads: it sets no warning filter and no PIL global; the pixel limit is its own check of the
    header, whatever ``Image.MAX_IMAGE_PIXELS`` is (PIL's own check still applies on top: 413 when it refuses).
    """
    if not data:
        raise RequestError(400, "the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # lazy: reads the header, not the pixels
        width, height = image.size  # of the first frame, the only one decoded
        if width * height > max_pixels:
            raise RequestError(413, f"image of {width}x{height} pixels is over the limit of {max_pixels} pixels")
        if width < 1 or height < 1:
            raise RequestError(400, f"image of {width}x{height} pixels is empty")
        if size:
            image.draft("RGB", (size, size))  # JPEG and MPO only (a no-op for others); keeps the mode, scales only
        image.load()  # the first frame only; truncated data raises OSError
        try:
            ImageOps.exif_transpose(image, in_place=True)
        except DECODER_ERRORS:
            pass  # unreadable EXIF: the pixels are fine, score them as stored
        return _to_rgb(image)
    except RequestError:
        raise
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"image is over the limit of {max_pixels} pixels: {e}") from None
    except DECODER_ERRORS as e:
        raise RequestError(400, f"cannot decode the image: {e}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB image: 16-bit values scaled (not clipped) to 8 bits, transparency composited over white."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image)  # uint16 in the file's byte order, or int32 for "I"
        if values.dtype.kind == "i":
            values = np.clip(values, 0, 65535)
        image = Image.fromarray(((values.astype(np.uint32) + 128) // 257).astype(np.uint8))  # round(v / 257)
    transparent = (image.mode in ALPHA_MODES or "transparency" in image.info
                   or (image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")))
    if not transparent:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
