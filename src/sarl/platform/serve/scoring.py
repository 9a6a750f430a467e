"""The one way images become probabilities, shared by Serve's replicas and ``sarl predict``.

An :class:`ImageScorer` holds a checkpoint's model on a device (an alias resolved, its id and digest known),
decodes and transforms image bytes exactly as a prediction request's are (``io.decode_image``: EXIF
orientation, colour modes, pixel limit, JPEGs decoded at reduced scale to the model's input size), and scores
a list of preprocessed images under a bound vocabulary (``BoundVocabulary.score_list``: bf16 autocast on CUDA,
fp32 cosines). So an image gets the same scores from ``POST /v1/predict`` and from a bulk run, for the same
checkpoint and vocabulary version.
"""

from __future__ import annotations

from typing import Any

import torch

from ...model.checkpoint import load_checkpoint
from ...model.data.transforms import build_transforms
from ...model.serving import BoundVocabulary, bind_vocabulary
from .. import node_cache
from ..aliases import served_checkpoint
from ..word_vectors import load as load_vectors
from .io import decode_image

DEFAULT_MAX_PIXELS = 100_000_000  # full-resolution phone (48-50 MP) and camera (45-61 MP) photos pass


def pick_device(device: str) -> torch.device:
    """``auto``: CUDA when this process has a GPU, else the CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ImageScorer:
    """A checkpoint's model on ``device`` with its preprocessing, and the scoring of batches."""

    def __init__(self, checkpoint: str, device: str = "auto", resolved: dict[str, Any] | None = None,
                 word_vectors: str | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.device = pick_device(device)
        self.checkpoint = served_checkpoint(checkpoint, resolved)
        self.model_info = {"id": self.checkpoint.model_id, "digest": self.checkpoint.digest}
        self.model = load_checkpoint(self.checkpoint.local, map_location=self.device,
                                     resolve=node_cache.local_copy).eval()
        cfg = self.model.config
        self.transform = build_transforms(cfg.image_size, cfg.mean, cfg.std, train=False)
        self.word_vectors = load_vectors(word_vectors) if word_vectors else None  # pickles refused
        self.max_image_pixels = max_image_pixels

    def bind(self, vocabulary: Any) -> BoundVocabulary:
        """The per-category tensors of ``vocabulary`` for this model (once per version, never per image)."""
        return bind_vocabulary(self.model, vocabulary, self.word_vectors)

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Image bytes to the model's (3, H, W) input; ``io.RequestError`` (400 / 413) for bad images."""
        return self.transform(decode_image(data, self.max_image_pixels, self.model.config.image_size))

    def blank(self) -> torch.Tensor:
        size = self.model.config.image_size
        return torch.zeros(3, size, size)

    def score(self, bound: BoundVocabulary, images: list[torch.Tensor]) -> list[list[float]]:
        """Probabilities per image (served category order); runs the forward: call it off any event loop."""
        return bound.score_list(self.model, images, self.device)


__all__ = ["DEFAULT_MAX_PIXELS", "ImageScorer", "pick_device"]
