"""One entry point for every data set kind: ``build_dataset(kind, root, split, transform, ...)``.

Job configs name a kind and a root; this maps them to the builder of that kind, so the
engine and the platform never branch on data set formats.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .coco import build_coco
from .datasets import MultiLabelDataset, check_on_bad_image
from .label_studio import build_label_studio
from .manifest import build_manifest
from .nuswide import build_nuswide
from .synthetic import SyntheticShapes
from .voc import VOC_WORDS, build_voc, check_difficult


def build_synthetic(
    root: str | Path | None,
    split: str,
    transform: Callable[..., Any] | None = None,
    categories: Sequence[str] | None = None,
    on_bad_image: str = "error",
    num_images: int = 1000,
    **kwargs: Any,
) -> SyntheticShapes:
    """:class:`SyntheticShapes` under the common builder signature; ``root`` is unused (nothing on disk).

    ``kwargs`` go to :class:`SyntheticShapes` (``image_size``, ``num_classes``, ``min_objects``,
    ``max_objects``, ``seed``); ``split`` picks the random stream, so train and test differ.
    """
    check_on_bad_image(on_bad_image)
    return SyntheticShapes(num_images, transform=transform, split=split, categories=categories, **kwargs)


DATASET_BUILDERS: dict[str, Callable[..., MultiLabelDataset]] = {
    "coco": build_coco,
    "label_studio": build_label_studio,
    "manifest": build_manifest,
    "nuswide": build_nuswide,
    "synthetic": build_synthetic,
    "voc": build_voc,
}
DATASET_KINDS: tuple[str, ...] = tuple(sorted(DATASET_BUILDERS))
# Word-vector lookups for category names of a kind that are not words (``Category.words``).
DATASET_WORDS: dict[str, dict[str, str]] = {"voc": VOC_WORDS}


# What a builder's ``**kwargs`` go to, so that ``check_options`` knows their names too.
_FORWARDED: dict[str, Callable[..., Any]] = {"synthetic": SyntheticShapes}
_COMMON_ARGS = ("root", "split", "transform", "categories", "on_bad_image")
# Options whose values can be checked without the data: kind -> {option: check raising ValueError}.
_OPTION_CHECKS: dict[str, dict[str, Callable[[Any], Any]]] = {"voc": {"difficult": check_difficult}}


def dataset_options(kind: str) -> tuple[str, ...] | None:
    """The ``data.options`` keys a kind takes (sorted), from its builder's signature; None if it takes any."""
    builder = DATASET_BUILDERS.get(kind)
    if builder is None:
        raise ValueError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASET_KINDS)}")
    names: set[str] = set()
    for fn in (builder, _FORWARDED.get(kind)):
        if fn is None:
            continue
        params = inspect.signature(fn).parameters.values()
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if fn is builder and any(p.kind is p.VAR_KEYWORD for p in params) and kind not in _FORWARDED:
            return None
    return tuple(sorted(names - set(_COMMON_ARGS)))


def check_options(kind: str, options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming any ``options`` key the kind's builder does not take, and the valid ones,
    or a value that cannot be right (VOC's ``difficult``).

    Called when a job is loaded, so that a wrong key fails before any worker starts, not as a TypeError inside
    the workers.
    """
    valid = dataset_options(kind)
    unknown = sorted(set(options) - set(valid)) if valid is not None else []
    if unknown:
        raise ValueError(f"data.options {', '.join(map(repr, unknown))} not taken by data set kind {kind!r}; "
                         f"its options are: {', '.join(valid) or '(none)'}")
    for key, check in _OPTION_CHECKS.get(kind, {}).items():
        if key in options:
            check(options[key])


def category_words(kind: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The words to look up for a kind's category names: the kind's own mapping, then ``overrides``."""
    return {**DATASET_WORDS.get(kind, {}), **(overrides or {})}


def build_dataset(
    kind: str,
    root: str | Path | None,
    split: str,
    transform: Callable[..., Any] | None = None,
    categories: Sequence[str] | None = None,
    on_bad_image: str = "error",
    **kwargs: Any,
) -> MultiLabelDataset:
    """Build a :class:`MultiLabelDataset` of the given kind.

    Args:
        kind: one of :data:`DATASET_KINDS` (``coco``, ``manifest``, ``nuswide``, ``synthetic``, ``voc``).
        root: the data set's folder (for ``manifest``, the folder or the manifest file; unused by ``synthetic``).
        split: ``train``, ``val``, ``test``, ``trainval`` ... as the kind understands it.
        transform: applied to each RGB PIL image (see :func:`build_transforms`).
        categories: category names in column order; default the kind's own list.
        on_bad_image: ``"error"`` or ``"skip"`` (see :class:`MultiLabelDataset`).
        kwargs: kind-specific options, e.g. ``annotation_file``/``image_dir`` (coco),
            ``difficult``/``year`` (voc), ``image_list``/``label_file``/``concepts_file`` (nuswide),
            ``manifest`` (manifest), ``num_images``/``seed``/``image_size`` (synthetic).

    Raises:
        ValueError: an unknown kind (the message lists the valid ones) or ``on_bad_image``.
    """
    builder = DATASET_BUILDERS.get(kind)
    if builder is None:
        raise ValueError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASET_KINDS)}")
    return builder(root, split, transform=transform, categories=categories, on_bad_image=on_bad_image, **kwargs)
