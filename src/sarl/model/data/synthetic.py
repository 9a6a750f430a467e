"""Synthetic multi-label images: coloured shapes on a noisy background, generated on demand.

Tests, the demo and benchmarks need a multi-label data set that costs no download and that
a tiny model can learn in minutes on a CPU. Each image holds between ``min_objects`` and
``max_objects`` *different* shapes; its labels say which shapes are present. A shape's class
is fixed by its form alone (colour, position, size and a small rotation are random), and
shapes are large (a quarter to half the image across) and mostly non-overlapping.

With ``class_colors=True`` (the default) each class also has its own hue from :data:`PALETTE`
(jittered, on a grey background): CLIP towers trained from random weights pick colour up within a
few epochs but form only slowly (patchify/strided stems at 64 px), so this is what lets the tiny
model learn in minutes on a CPU. ``class_colors=False`` leaves form as the only cue: a harder task.

Item ``i`` is drawn from ``np.random.default_rng([seed, crc32(split), i])``: any worker can
render any item, with no disk and no shared state, and the same (seed, split, i) always gives
the same pixels. ``split`` gives train and test sets of one seed independent images.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .datasets import MultiLabelDataset
from .manifest import ManifestRow, write_manifest

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "star", "bar", "diamond")

_SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges keep small shapes recognisable
_MIN_CONTRAST = 140.0  # least RGB distance between a shape and the background colour
_NOISE_STD = 14.0  # per-pixel Gaussian noise over the whole image, in 0-255 units
_RADIUS = (0.15, 0.23)  # shape radius range, as a fraction of the image side
# One saturated hue per shape class (with class_colors=True), in SHAPES order.
PALETTE: tuple[tuple[int, int, int], ...] = ((230, 40, 40), (40, 200, 60), (50, 80, 235), (240, 220, 40),
                                             (220, 60, 220), (40, 220, 220), (245, 140, 30), (140, 70, 200))
_JITTER = 25  # per-channel colour jitter around the class hue


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape: class index, centre and radius in pixels, RGB colour, rotation in degrees."""

    shape: int
    cx: float
    cy: float
    radius: float
    color: tuple[int, int, int]
    angle: float


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image: background colour and the shapes in drawing order."""

    background: tuple[int, int, int]
    objects: tuple[ShapeObject, ...]


def _random_color(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    for _ in range(64):
        color = rng.integers(0, 256, size=3)
        if np.linalg.norm(color - background) >= _MIN_CONTRAST:
            return tuple(int(c) for c in color)
    return tuple(int(c) for c in 255 - background)  # the complement always contrasts enough


def _class_color(rng: np.random.Generator, shape: int) -> tuple[int, int, int]:
    jitter = rng.integers(-_JITTER, _JITTER + 1, size=3)
    return tuple(int(c) for c in np.clip(np.asarray(PALETTE[shape]) + jitter, 0, 255))


def draw_scene(rng: np.random.Generator, image_size: int, classes: Sequence[int], min_objects: int,
               max_objects: int, class_colors: bool = True) -> Scene:
    """Draw a scene: how many shapes, which ones (distinct), where, how big, which colours."""
    k = int(rng.integers(min_objects, max_objects + 1))
    chosen = rng.choice(len(classes), size=k, replace=False)
    if class_colors:  # a dark or a light grey: every palette hue stands out from both
        background = np.full(3, rng.integers(30, 90) if rng.random() < 0.5 else rng.integers(170, 230))
    else:
        background = rng.integers(0, 256, size=3)
    objects: list[ShapeObject] = []
    for c in chosen:
        radius = float(rng.uniform(*_RADIUS)) * image_size
        best: tuple[float, float] | None = None
        best_gap = -math.inf
        for _ in range(30):  # rejection sampling for little overlap; keep the best try if none is clear
            cx, cy = (float(v) for v in rng.uniform(radius, image_size - radius, size=2))
            gap = min((math.hypot(cx - o.cx, cy - o.cy) - 0.85 * (radius + o.radius) for o in objects),
                      default=math.inf)
            if gap > best_gap:
                best, best_gap = (cx, cy), gap
            if gap >= 0:
                break
        shape = int(classes[int(c)])
        angle = float(rng.uniform(-12.0, 12.0))
        if SHAPES[shape] == "bar":
            angle += 90.0 * int(rng.integers(2))
        elif SHAPES[shape] in ("square", "diamond", "circle", "ring"):
            angle = 0.0  # a rotated square is a diamond: keep the two apart by orientation
        assert best is not None
        color = _class_color(rng, shape) if class_colors else _random_color(rng, background)
        objects.append(ShapeObject(shape, best[0], best[1], radius, color, angle))
    return Scene(tuple(int(v) for v in background), tuple(objects))


def _polygon(name: str, r: float) -> list[tuple[float, float]]:
    """Vertices of a shape of radius ``r`` centred on the origin (y down), before rotation."""
    if name == "square":
        s = 0.8 * r
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if name == "diamond":
        return [(0, -r), (r, 0), (0, r), (-r, 0)]
    if name == "triangle":
        return [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if name == "star":
        return [((r if i % 2 == 0 else 0.42 * r) * math.cos(math.radians(-90 + 36 * i)),
                 (r if i % 2 == 0 else 0.42 * r) * math.sin(math.radians(-90 + 36 * i))) for i in range(10)]
    if name == "cross":
        w = 0.3 * r
        return [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
                (-w, -w)]
    if name == "bar":
        w = 0.28 * r
        return [(-r, -w), (r, -w), (r, w), (-r, w)]
    raise ValueError(f"no polygon for shape {name!r}")


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render a scene to an RGB image of ``image_size`` pixels; ``rng`` supplies the pixel noise."""
    big = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        name = SHAPES[obj.shape]
        cx, cy, r = obj.cx * _SUPERSAMPLE, obj.cy * _SUPERSAMPLE, obj.radius * _SUPERSAMPLE
        if name == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=obj.color)
        elif name == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=obj.color, width=max(1, round(0.38 * r)))
        else:
            a = math.radians(obj.angle)
            cos_a, sin_a = math.cos(a), math.sin(a)
            points = [(cx + x * cos_a - y * sin_a, cy + x * sin_a + y * cos_a) for x, y in _polygon(name, r)]
            draw.polygon(points, fill=obj.color)
    small = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)
    noisy = small + rng.normal(0.0, _NOISE_STD, size=small.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


class SyntheticShapes(MultiLabelDataset):
    """A seeded, in-memory multi-label data set of shapes (see the module docstring).

    Args:
        num_images: number of items.
        image_size: side of the square images, in pixels.
        num_classes: the first ``num_classes`` of :data:`SHAPES` are the categories (1 to 8).
        min_objects, max_objects: each image holds this many distinct shapes (inclusive range).
        seed: non-negative seed; with ``split`` and the item index it fixes each image.
        transform: applied to the PIL image, as for any :class:`MultiLabelDataset`.
        split: stream name, so ``"train"`` and ``"test"`` of one seed differ.
        categories: shape names to use instead of the first ``num_classes`` (any order).
        class_colors: each class drawn in its own (jittered) hue; False: random colours, form is the only cue.
    """

    def __init__(
        self,
        num_images: int,
        image_size: int = 64,
        num_classes: int = 8,
        min_objects: int = 1,
        max_objects: int = 3,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
        split: str = "train",
        categories: Sequence[str] | None = None,
        class_colors: bool = True,
    ) -> None:
        self.class_colors = bool(class_colors)
        if categories is not None:
            unknown = [c for c in categories if c not in SHAPES]
            if unknown:
                raise ValueError(f"unknown synthetic shapes {unknown}; valid: {', '.join(SHAPES)}")
            classes = [SHAPES.index(c) for c in categories]
        else:
            if not 1 <= num_classes <= len(SHAPES):
                raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
            classes = list(range(num_classes))
        if not 0 <= min_objects <= max_objects <= len(classes):
            raise ValueError(f"need 0 <= min_objects <= max_objects <= num_classes ({len(classes)}), "
                             f"got min_objects={min_objects}, max_objects={max_objects}")
        if num_images < 0 or image_size < 8 or seed < 0:
            raise ValueError(
                f"need num_images >= 0, image_size >= 8, seed >= 0; got {num_images}, {image_size}, {seed}"
            )
        self.image_size = int(image_size)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.seed, self.split = int(seed), str(split)
        self.classes = classes
        self._item_ids = np.arange(num_images, dtype=np.int64)
        labels = np.zeros((num_images, len(classes)), dtype=np.int8)
        for i in range(num_images):
            for obj in self.scene(i).objects:
                labels[i, classes.index(obj.shape)] = 1
        names = [f"synthetic:{self.split}:{self.seed}:{i}" for i in range(num_images)]
        super().__init__(names, labels, [SHAPES[c] for c in classes], transform, on_bad_image="error")

    def _rng(self, index: int) -> np.random.Generator:
        item = int(self._item_ids[index])
        return np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), item])

    def scene(self, index: int) -> Scene:
        """The scene of item ``index`` (no rendering): which shapes, where, which colours."""
        return draw_scene(self._rng(index), self.image_size, self.classes, self.min_objects, self.max_objects,
                          self.class_colors)

    def load_image(self, index: int) -> Image.Image:
        """Render item ``index``; the scene draw comes first in its random stream, then the noise."""
        rng = self._rng(index)
        scene = draw_scene(rng, self.image_size, self.classes, self.min_objects, self.max_objects, self.class_colors)
        return render_scene(scene, self.image_size, rng)

    def subset(self, indices: Sequence[int] | np.ndarray) -> SyntheticShapes:
        """A copy with only the items at ``indices``; they render the same pixels as before."""
        new = super().subset(indices)
        new._item_ids = self._item_ids[np.asarray(indices, dtype=np.int64).reshape(-1)]
        return new

    def write_to(self, folder: str | Path, manifest_name: str = "manifest.jsonl") -> Path:
        """Write every item as ``folder/images/NNNNNN.png`` plus a JSONL manifest; return the manifest path.

        The manifest holds the current labels (names present, and ``unknown`` for -1 entries),
        so ``build_dataset("manifest", folder, ..., categories=self.categories)`` reads the same
        data back from disk (pass the categories to keep this column order).
        """
        folder = Path(folder)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(len(self)):
            rel = f"images/{i:06d}.png"
            self.load_image(i).save(folder / rel)
            row = self.labels[i]
            rows.append(ManifestRow(rel, [c for c, v in zip(self.categories, row) if v == 1],
                                    [c for c, v in zip(self.categories, row) if v == -1]))
        return write_manifest(folder / manifest_name, rows)
