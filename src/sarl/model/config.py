"""Typed configuration: dataclasses built from plain dicts / YAML, with ``key=value`` overrides.

Every section is a dataclass. ``from_dict`` walks the dataclass fields, so an unknown key, a value of the
wrong type or a value outside a field's allowed set is an error that names the dotted key. Fields declare
their constraints in ``metadata``: ``choices`` (allowed values) and ``check`` (a predicate with a message).
The resolved configuration is written back with ``to_dict`` and saved beside every run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


def field(default: Any = dataclasses.MISSING, *, choices: Iterable[Any] | None = None,
          check: tuple[Callable[[Any], bool], str] | None = None, default_factory: Any = dataclasses.MISSING,
          help: str = "") -> Any:
    """A dataclass field with validation metadata (``choices`` or ``check=(predicate, 'must be ...')``)."""
    meta = {"choices": tuple(choices) if choices is not None else None, "check": check, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def in_unit_interval(open_low: bool = True) -> tuple[Callable[[Any], bool], str]:
    """Check for a proportion: ``(0, 1]`` by default, ``[0, 1]`` with ``open_low=False``."""
    if open_low:
        return (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")
    return (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")


def positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > 0, "must be > 0")


def non_negative() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= 0, "must be >= 0")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, Mapping) and len(sections) == 1:  # e.g. ``cache: {...}`` of ``CacheConfig | bool``:
            return _coerce(value, sections[0], key)  # its own errors name the bad nested key
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} is not a valid {' | '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError naming them."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''}{where}: "
                          f"{', '.join(_join(prefix, k) for k in unknown)} (valid: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        key = _join(prefix, name)
        value = _coerce(value, hints[name], key)
        _validate(fields[name], value, key)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None


def _validate(f: dataclasses.Field, value: Any, key: str) -> None:
    if value is None:
        return
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    check = f.metadata.get("check")
    if check is not None and not check[0](value):
        raise ConfigError(f"{key}: {value!r} {check[1]}")


def validate(obj: Any, prefix: str = "") -> None:
    """Re-check every field of a dataclass instance (for objects built in code rather than from a dict)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, key)
        else:
            _validate(f, value, key)


def to_dict(obj: Any) -> dict[str, Any]:
    """The dataclass as plain data (lists, dicts, scalars) for YAML/JSON."""
    return _plain(dataclasses.asdict(obj))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


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
                base: Mapping[str, Any] | None = None) -> T:
    """``cls`` from (defaults ``base``) <- YAML file ``path`` <- ``key=value`` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = merge(data, load_yaml(path))
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)
