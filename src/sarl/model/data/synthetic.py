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

``preset="hard"`` (:data:`HARD_SHAPES`, 16 categories named by real words) is a benchmark that does not saturate:
twice the categories, objects that may overlap and hide each other, a tinted gradient background with clutter
strokes, colours shared by two categories (a bright and a dark shade of each hue), an unlabelled
distractor shapes that look like a category (an ellipse beside the circle, a rectangle beside the square and the
bar, a four-point star, an arc beside the ring and the crescent), objects in a random colour and distractors in
a category's colour, and label co-occurrence: an image draws most of its objects from one of four groups.
Calibrated so that the tiny model is far from saturation (about 67 test mAP at 90% known labels in 16 epochs;
docs/results/synthetic-hard-protocol).
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

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "star", "bar", "diamond",
                           "pentagon", "hexagon", "heart", "arrow", "crescent", "trapezoid", "chevron", "kite")
EASY_SHAPES: tuple[str, ...] = SHAPES[:8]  # the default preset's categories
HARD_SHAPES: tuple[str, ...] = SHAPES  # ``preset="hard"``: all 16
# Shapes drawn in hard images without a label: each looks like one or two categories.
DISTRACTORS: tuple[str, ...] = ("ellipse", "rectangle", "star4", "arc")
PRESETS: tuple[str, ...] = ("easy", "hard")
# Co-occurrence of the hard preset: an image picks one group and draws each object from it with this probability.
HARD_GROUPS: tuple[tuple[str, ...], ...] = (("circle", "ring", "crescent", "heart"),
                                            ("square", "diamond", "trapezoid", "kite"),
                                            ("triangle", "arrow", "chevron", "star"),
                                            ("cross", "bar", "pentagon", "hexagon"))
_HARD_IN_GROUP = 0.75
_HARD_RADIUS = (0.2, 0.28)  # radius range (fraction of the side): objects overlap and partly hide each other
_HARD_RANDOM_COLOR = 0.1  # share of hard objects drawn in a random colour instead of their (shared) hue
_HARD_JITTER = 20
_HARD_BACKGROUND = (40, 220)  # grey level of the background's first colour
_HARD_TINT = 15  # per-channel offset from that grey: a tinted grey
_HARD_GRADIENT = 40  # per-channel change from the first background colour to the second, at most
_HARD_DISTRACTORS = (0, 1)  # unlabelled look-alike shapes per image (inclusive range)
_HARD_CLUTTER = (1, 3)  # thin strokes per image (inclusive range)

_SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges keep small shapes recognisable
_MIN_CONTRAST = 140.0  # least RGB distance between a shape and the background colour
_NOISE_STD = 14.0  # per-pixel Gaussian noise over the whole image, in 0-255 units
_RADIUS = (0.15, 0.23)  # shape radius range, as a fraction of the image side
# One saturated hue per shape class (with class_colors=True), in SHAPES order.
PALETTE: tuple[tuple[int, int, int], ...] = ((230, 40, 40), (40, 200, 60), (50, 80, 235), (240, 220, 40),
                                             (220, 60, 220), (40, 220, 220), (245, 140, 30), (140, 70, 200))
# The hard preset's colours: PALETTE's 8 hues, bright for the first 8 categories and dark for the last 8, so a
# colour names one category, except for the objects drawn in a random colour and the distractors drawn in a
# category's colour.
HARD_PALETTE: tuple[tuple[int, int, int], ...] = PALETTE + tuple(tuple(int(0.5 * v) for v in c) for c in PALETTE)
_JITTER = 25  # per-channel colour jitter around the class hue
# Rendered images are kept (as uint8 arrays, by item) when a whole data set fits in this many bytes: every epoch
# reads the same pixels, and rendering costs about 1.6 ms a 64-pixel hard image, more than a tiny model's step.
_RENDER_CACHE_BYTES = 256 * 2**20


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
    """Everything needed to render one image: background colour and the shapes in drawing order.

    The hard preset adds ``clutter`` (thin strokes: RGB, width and two end points each), unlabelled
    ``distractors`` (drawn like objects; their ``shape`` indexes :data:`DISTRACTORS`) and a second background
    colour the background fades to (``gradient``)."""

    background: tuple[int, int, int]
    objects: tuple[ShapeObject, ...]
    distractors: tuple[ShapeObject, ...] = ()
    clutter: tuple[tuple[tuple[int, int, int], int, tuple[float, float, float, float]], ...] = ()
    gradient: tuple[int, int, int] | None = None


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


def draw_hard_scene(rng: np.random.Generator, image_size: int, classes: Sequence[int], min_objects: int,
                    max_objects: int) -> Scene:
    """A hard scene (see the module docstring): grouped categories, small overlapping objects, distractors,
    clutter and a gradient background."""
    names = [SHAPES[c] for c in classes]
    groups = [[names.index(n) for n in g if n in names] for g in HARD_GROUPS]
    groups = [g for g in groups if g]
    k = int(rng.integers(min_objects, max_objects + 1))
    group = groups[int(rng.integers(len(groups)))] if groups else []
    chosen: list[int] = []
    while len(chosen) < k:
        pool = group if group and rng.random() < _HARD_IN_GROUP else range(len(classes))
        pool = [c for c in pool if c not in chosen] or [c for c in range(len(classes)) if c not in chosen]
        chosen.append(int(pool[int(rng.integers(len(pool)))]))
    first = np.clip(rng.integers(_HARD_BACKGROUND[0], _HARD_BACKGROUND[1] + 1)
                    + rng.integers(-_HARD_TINT, _HARD_TINT + 1, size=3), 0, 255)
    second = np.clip(first + rng.integers(-_HARD_GRADIENT, _HARD_GRADIENT + 1, size=3), 0, 255)

    def place(shape_name: str) -> tuple[float, float, float, float]:
        radius = float(rng.uniform(*_HARD_RADIUS)) * image_size
        cx, cy = (float(v) for v in rng.uniform(radius * 0.6, image_size - radius * 0.6, size=2))
        angle = float(rng.uniform(-20.0, 20.0))
        if shape_name in ("bar", "rectangle", "ellipse"):
            angle += 90.0 * int(rng.integers(2))
        elif shape_name in ("square", "diamond", "circle", "ring"):
            angle = 0.0
        return cx, cy, radius, angle

    def color(hue: int) -> tuple[int, int, int]:
        if rng.random() < _HARD_RANDOM_COLOR:
            return _random_color(rng, first)
        jitter = rng.integers(-_HARD_JITTER, _HARD_JITTER + 1, size=3)
        return tuple(int(c) for c in np.clip(np.asarray(HARD_PALETTE[hue]) + jitter, 0, 255))

    objects = []
    for c in chosen:
        shape = int(classes[c])
        cx, cy, radius, angle = place(SHAPES[shape])
        objects.append(ShapeObject(shape, cx, cy, radius, color(shape), angle))
    distractors = []
    for _ in range(int(rng.integers(_HARD_DISTRACTORS[0], _HARD_DISTRACTORS[1] + 1))):
        d = int(rng.integers(len(DISTRACTORS)))
        cx, cy, radius, angle = place(DISTRACTORS[d])
        distractors.append(ShapeObject(d, cx, cy, radius, color(int(rng.integers(len(HARD_PALETTE)))), angle))
    clutter = []
    for _ in range(int(rng.integers(_HARD_CLUTTER[0], _HARD_CLUTTER[1] + 1))):
        x0, y0 = (float(v) for v in rng.uniform(0, image_size, size=2))
        length, theta = float(rng.uniform(0.1, 0.5)) * image_size, float(rng.uniform(0, 2 * math.pi))
        clutter.append((_random_color(rng, first), int(rng.integers(1, 3)),
                        (x0, y0, x0 + length * math.cos(theta), y0 + length * math.sin(theta))))
    # Objects and distractors in one random drawing order: any of them may hide part of another.
    return Scene(tuple(int(v) for v in first), tuple(objects), tuple(distractors), tuple(clutter),
                 tuple(int(v) for v in second))


def _heart(r: float, n: int = 24) -> list[tuple[float, float]]:
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((r * x / 17, -r * y / 17 + 0.1 * r))
    return pts


def _crescent(r: float, n: int = 16) -> list[tuple[float, float]]:
    """Outer arc of a circle of radius r, back along an inner circle shifted right: a crescent opening right."""
    outer = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in np.linspace(60, 300, n)]
    inner = [(0.45 * r + 0.75 * r * math.cos(math.radians(a)), 0.75 * r * math.sin(math.radians(a)))
             for a in np.linspace(-100, -260, n)]
    return outer + inner


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
    if name in ("pentagon", "hexagon"):
        n = 5 if name == "pentagon" else 6
        return [(r * math.cos(math.radians(-90 + 360 * i / n)), r * math.sin(math.radians(-90 + 360 * i / n)))
                for i in range(n)]
    if name == "heart":
        return _heart(r)
    if name == "arrow":
        w, h = 0.22 * r, 0.55 * r
        return [(-r, -w), (0.2 * r, -w), (0.2 * r, -h), (r, 0), (0.2 * r, h), (0.2 * r, w), (-r, w)]
    if name == "crescent":
        return _crescent(r)
    if name == "trapezoid":
        return [(-0.45 * r, -0.6 * r), (0.45 * r, -0.6 * r), (r, 0.6 * r), (-r, 0.6 * r)]
    if name == "chevron":
        t = 0.35 * r
        return [(-r, -0.6 * r), (0, 0.2 * r), (r, -0.6 * r), (r, -0.6 * r + t), (0, 0.2 * r + t),
                (-r, -0.6 * r + t)]
    if name == "kite":
        return [(0, -r), (0.6 * r, -0.3 * r), (0, r), (-0.6 * r, -0.3 * r)]
    if name == "rectangle":  # distractor: wider than the square, thicker than the bar
        return [(-r, -0.55 * r), (r, -0.55 * r), (r, 0.55 * r), (-r, 0.55 * r)]
    if name == "star4":  # distractor: a star with four points
        return [((r if i % 2 == 0 else 0.35 * r) * math.cos(math.radians(-90 + 45 * i)),
                 (r if i % 2 == 0 else 0.35 * r) * math.sin(math.radians(-90 + 45 * i))) for i in range(8)]
    raise ValueError(f"no polygon for shape {name!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, obj: ShapeObject) -> None:
    cx, cy, r = obj.cx * _SUPERSAMPLE, obj.cy * _SUPERSAMPLE, obj.radius * _SUPERSAMPLE
    a = math.radians(obj.angle)
    cos_a, sin_a = math.cos(a), math.sin(a)
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=obj.color)
    elif name == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=obj.color, width=max(1, round(0.38 * r)))
    elif name == "arc":  # distractor: two thirds of a ring
        start = obj.angle * 10 % 360
        draw.arc((cx - r, cy - r, cx + r, cy + r), start, start + 240, fill=obj.color, width=max(1, round(0.38 * r)))
    elif name == "ellipse":  # distractor: a flattened circle
        w, h = (r, 0.6 * r) if abs(obj.angle) < 45 else (0.6 * r, r)
        draw.ellipse((cx - w, cy - h, cx + w, cy + h), fill=obj.color)
    else:
        points = [(cx + x * cos_a - y * sin_a, cy + x * sin_a + y * cos_a) for x, y in _polygon(name, r)]
        draw.polygon(points, fill=obj.color)


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render a scene to an RGB image of ``image_size`` pixels; ``rng`` supplies the pixel noise (and, for a hard
    scene, the order in which objects and distractors are drawn)."""
    big = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), scene.background)
    if scene.gradient is not None:  # a linear fade from the background colour to the second one
        ramp = np.linspace(0.0, 1.0, big, dtype=np.float32)[None, :, None]
        pixels = (1 - ramp) * np.asarray(scene.background, np.float32) + ramp * np.asarray(scene.gradient, np.float32)
        canvas = Image.fromarray(np.broadcast_to(pixels, (big, big, 3)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for color, width, (x0, y0, x1, y1) in scene.clutter:
        s = _SUPERSAMPLE
        draw.line((x0 * s, y0 * s, x1 * s, y1 * s), fill=color, width=width * s)
    items = [(SHAPES[o.shape], o) for o in scene.objects] + [(DISTRACTORS[o.shape], o) for o in scene.distractors]
    if scene.distractors or scene.clutter:
        items = [items[i] for i in rng.permutation(len(items))]
    for name, obj in items:
        _draw_shape(draw, name, obj)
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
        num_classes: int | None = None,
        min_objects: int = 1,
        max_objects: int | None = None,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
        split: str = "train",
        categories: Sequence[str] | None = None,
        class_colors: bool = True,
        preset: str = "easy",
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown synthetic preset {preset!r}; valid: {', '.join(PRESETS)}")
        self.preset = preset
        shapes = HARD_SHAPES if preset == "hard" else EASY_SHAPES
        num_classes = len(shapes) if num_classes is None else num_classes
        max_objects = (4 if preset == "hard" else 3) if max_objects is None else max_objects
        self.class_colors = bool(class_colors)
        if categories is not None:
            unknown = [c for c in categories if c not in shapes]
            if unknown:
                raise ValueError(f"unknown synthetic shapes {unknown} for preset {preset!r}; "
                                 f"valid: {', '.join(shapes)}")
            classes = [SHAPES.index(c) for c in categories]
        else:
            if not 1 <= num_classes <= len(shapes):
                raise ValueError(f"num_classes must be in 1..{len(shapes)} for preset {preset!r}, got {num_classes}")
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
        # Shared with subsets (same item ids, same pixels); None when the data set is too large to keep.
        self._rendered: dict[int, np.ndarray] | None = (
            {} if num_images * self.image_size**2 * 3 <= _RENDER_CACHE_BYTES else None)
        labels = np.zeros((num_images, len(classes)), dtype=np.int8)
        for i in range(num_images):
            for obj in self.scene(i).objects:
                labels[i, classes.index(obj.shape)] = 1
        names = [f"synthetic:{self.split}:{self.seed}:{i}" for i in range(num_images)]
        super().__init__(names, labels, [SHAPES[c] for c in classes], transform, on_bad_image="error")

    def _rng(self, index: int) -> np.random.Generator:
        item = int(self._item_ids[index])
        return np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), item])

    def _draw(self, rng: np.random.Generator) -> Scene:
        if self.preset == "hard":
            return draw_hard_scene(rng, self.image_size, self.classes, self.min_objects, self.max_objects)
        return draw_scene(rng, self.image_size, self.classes, self.min_objects, self.max_objects, self.class_colors)

    def scene(self, index: int) -> Scene:
        """The scene of item ``index`` (no rendering): which shapes, where, which colours."""
        return self._draw(self._rng(index))

    def load_image(self, index: int) -> Image.Image:
        """Render item ``index``; the scene draw comes first in its random stream, then the noise."""
        item = int(self._item_ids[index])
        if self._rendered is not None and item in self._rendered:
            return Image.fromarray(self._rendered[item], "RGB")
        rng = self._rng(index)
        image = render_scene(self._draw(rng), self.image_size, rng)
        if self._rendered is not None:
            self._rendered[item] = np.asarray(image)
        return image

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to a DataLoader worker or a Ray task) without the rendered images: they are re-rendered there."""
        state = dict(self.__dict__)
        if state.get("_rendered") is not None:
            state["_rendered"] = {}
        return state

    def __copy__(self) -> SyntheticShapes:
        """A shallow copy (``subset``, ``with_labels``, ``with_transform``) shares the rendered images."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

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
