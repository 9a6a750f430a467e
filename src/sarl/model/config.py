"""Typed configuration on pydantic v2: sections built from plain dicts / YAML, with ``key=value`` overrides.

Every section is a pydantic dataclass made with :func:`section` (``extra="forbid"``): its fields state their type,
default and constraints once (``Field(0.3, gt=0, le=1)``, ``Literal[...]`` for a fixed set of values), and the
JSON schema of any section comes from :func:`json_schema`. :func:`from_dict` turns pydantic's errors into one
``ConfigError`` whose message names the dotted key and the value, the way every command reports a bad job:

>>> from pydantic import Field
>>> @section
... class Train:
...     epochs: int = Field(50, gt=0)
...     seed: int = 0
>>> from_dict(Train, {"epochs": 3})
Train(epochs=3, seed=0)
>>> from_dict(Train, parse_overrides(["epochs=0"]), prefix="train")
Traceback (most recent call last):
...
sarl.model.config.ConfigError: train.epochs: 0 should be greater than 0
>>> from_dict(Train, {"epoch": 3}, prefix="train")
Traceback (most recent call last):
...
sarl.model.config.ConfigError: unknown key in train: train.epoch (valid: epochs, seed)

The resolved configuration is written back with ``to_dict`` and saved beside every run.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

T = TypeVar("T")

SECTION_CONFIG = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


def section(cls: type[T]) -> type[T]:
    """Make ``cls`` a configuration section: a pydantic dataclass that refuses unknown keys."""
    return _pydantic_dataclass(cls, config=SECTION_CONFIG)


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON schema of a section (``sarl config schema``)."""
    return _adapter(cls).json_schema()


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build section ``cls`` from ``data``; unknown keys and bad values raise ConfigError naming them."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    try:
        return _adapter(cls).validate_python(dict(data))
    except ValidationError as exc:
        raise ConfigError(describe(exc, cls, prefix)) from None


def describe(exc: ValidationError, cls: type, prefix: str = "") -> str:
    """pydantic's errors as one message of dotted keys and values (unknown keys grouped by section)."""
    unknown: dict[tuple, list[str]] = {}
    messages = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        if error["type"] == "unexpected_keyword_argument":
            unknown.setdefault(loc[:-1], []).append(_key(prefix, loc))
            continue
        messages.append(_message(error, _key(prefix, loc), _is_section(cls, loc)))
    for parent, keys in unknown.items():
        where = _key(prefix, parent)
        valid = ", ".join(sorted(f.name for f in dataclasses.fields(_section_at(cls, parent))))
        messages.insert(0, f"unknown key{'s' if len(keys) > 1 else ''}{f' in {where}' if where else ''}: "
                           f"{', '.join(sorted(keys))} (valid: {valid})")
    return "; ".join(messages)


def _message(error: Mapping[str, Any], key: str, of_section: bool) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "value_error":  # a field's validator, or a check of a whole section (its own sentence)
        cause = error.get("ctx", {}).get("error")
        text = str(cause) if cause is not None else error["msg"].removeprefix("Value error, ")
        return text if of_section else f"{key}: {value!r} {text}"
    if kind in ("missing", "missing_argument"):
        return f"{key}: required"
    if kind == "literal_error":
        return f"{key}: {value!r} is not one of {error['ctx']['expected']}"
    return f"{key}: {value!r} {error['msg'].removeprefix('Input ')}"


def _key(prefix: str, loc: Iterable[Any]) -> str:
    key = prefix
    for part in loc:
        key = f"{key}[{part}]" if isinstance(part, int) else (f"{key}.{part}" if key else str(part))
    return key


def _section_at(cls: type, loc: tuple) -> type | None:
    """The section class at location ``loc`` below ``cls``; None where ``loc`` is a field of a section."""
    for name in loc:
        hints = typing.get_type_hints(cls, include_extras=False) if dataclasses.is_dataclass(cls) else {}
        hint = hints.get(name)
        cls = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
        if cls is None:
            return None
    return cls


def _is_section(cls: type, loc: tuple) -> bool:
    return _section_at(cls, loc) is not None


def to_dict(obj: Any) -> dict[str, Any]:
    """The section as plain data (lists, dicts, scalars) for YAML/JSON."""
    return _plain(dataclasses.asdict(obj))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``["model.rank=64", "loss.name=asl"]`` into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return nested


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values of ``update`` win; nested mappings are merged."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (an empty file is an empty mapping)."""
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                base: Mapping[str, Any] | None = None, fixed: Mapping[str, Any] | None = None) -> T:
    """``cls`` from (defaults ``base``) <- YAML file ``path`` <- ``key=value`` overrides <- ``fixed`` values (what
    a caller sets whatever the user said, e.g. the protocol's proportion)."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = merge(data, load_yaml(path))
    data = merge(merge(data, parse_overrides(overrides)), fixed or {})
    return from_dict(cls, data)
