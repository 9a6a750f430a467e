"""Command options from a config section: the flags of ``sarl predict | calibrate | complete`` and the keys of
their ``--config`` files are one pydantic section each (``PredictConfig``, ``CalibrateConfig``,
``CompleteConfig``), so a flag, its help, its default and its check are written once, in the section.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar

from ..model.config import ConfigError, from_dict, load_yaml

T = TypeVar("T")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_section_flags(parser: argparse.ArgumentParser, section: type, skip: Iterable[str] = ()) -> None:
    """One flag per field of ``section`` (``--vocab-store`` for ``vocab_store``), its help from the field's
    description and default. Every flag defaults to None, so that ``load_command`` tells a flag given from one
    left to the ``--config`` file."""
    for name, info in section.__pydantic_fields__.items():
        if name in skip:
            continue
        kind = _unwrap(info.annotation)
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        help_text = info.description or ""
        if default not in (None, False, [], ""):
            help_text += f" (default {default})"
        options: dict[str, Any] = {"help": help_text.strip() or None, "default": None}
        if kind is bool:
            options["action"] = "store_true"
        elif typing.get_origin(kind) is list:
            options.update(nargs="*", metavar="KEY=VALUE")
        elif typing.get_origin(kind) is Literal:
            options["choices"] = typing.get_args(kind)
        else:
            options["type"] = kind
        parser.add_argument(flag(name), **options)


def _unwrap(annotation: Any) -> Any:
    """``int`` of ``int | None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def load_command(section: type[T], args: argparse.Namespace, paths: tuple[str, ...] = ()) -> T:
    """``section`` from the ``--config`` YAML (keys as the fields, ``-`` or ``_``) with the flags given on top;
    the local paths among the fields named in ``paths`` made absolute (``storage.local_path``: relative to
    ``$SARL_BASE_DIR`` when set), once, before anything runs in other working directories or on other nodes."""
    options = load_yaml(args.config) if args.config else {}
    options = {str(k).replace("-", "_"): v for k, v in options.items()}
    flags = {name: getattr(args, name) for name in section.__pydantic_fields__ if getattr(args, name, None) is not None}
    values = {**options, **flags}
    missing = [name for name, info in section.__pydantic_fields__.items()
               if info.is_required() and values.get(name) in (None, "")]
    if missing:
        raise ConfigError(f"give {', '.join(flag(n) for n in missing)} (or a --config with them)")
    try:
        config = from_dict(section, values)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {args.config} or the flags)" if args.config else str(exc)) from None
    from ..platform import storage

    for name in paths:
        value = getattr(config, name)
        if value and not storage.is_s3(value):
            setattr(config, name, str(storage.local_path(value)))
    return config
