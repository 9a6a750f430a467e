"""A versioned vocabulary store on a local path or ``s3://``: immutable versions and a movable pointer.

Layout of a store at ``root``::

    root/versions/<version>.json   one immutable vocabulary per version (``Vocabulary.to_dict()`` as JSON)
    root/CURRENT.json              {"version": ..., "updated_at": ..., "fingerprint": ...}

Serve replicas poll ``CURRENT.json`` (one small read) and reload when it changes, so a
rollback is a pointer move and never rewrites a version. Writes never expose a half-written file: S3
PUTs are atomic and ``storage.write_text`` writes local files beside the target, then renames them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any

import yaml

from sarl.model.vocabulary import Vocabulary, VocabularyError
from sarl.platform import node_cache, storage
from sarl.platform.word_vectors import load as load_vectors

__all__ = ["VERSION_PATTERN", "VersionInfo", "VocabStore", "VocabStoreError", "check_against_checkpoint",
           "check_version", "read_vocabulary_file"]

VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Version strings become file names, so they are restricted to this (full match)."""

_POINTER = "CURRENT.json"
_VERSIONS = "versions"


class VocabStoreError(ValueError):
    """A user-facing store problem: bad version name, unknown version, a conflicting push, an empty store."""


@dataclass(frozen=True)
class VersionInfo:
    """One pushed version, as ``sarl vocab list`` shows it."""

    version: str
    categories: int
    zero_shot: int | None  # categories not among the caller's trained names; None when none were given
    updated_at: str  # push time (file mtime / S3 LastModified), ISO-8601 UTC
    current: bool


def check_version(version: str) -> str:
    """Return ``version`` if it is safe as a file name, else raise :class:`VocabStoreError` saying why."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise VocabStoreError(f"invalid version {version!r}: use 1-128 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    return version


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _natural(version: str) -> list[Any]:
    """Sort key that orders "2" before "10"; breaks ties between versions pushed in the same second (S3)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", version) if t]


def _mtimes(directory: str) -> dict[str, float]:
    """Names of the files directly in ``directory`` with their modification times (one listing on S3)."""
    if not storage.is_s3(directory):
        if not os.path.isdir(directory):
            return {}
        return {e.name: e.stat().st_mtime for e in os.scandir(directory) if e.is_file()}
    bucket, key = storage.parse_s3(directory)
    prefix = key.rstrip("/") + "/"
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    return {o["Key"][len(prefix):]: o["LastModified"].timestamp() for p in pages for o in p.get("Contents", [])}


def _parse(text: str, fmt: str, source: str) -> Any:
    try:
        return json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise VocabularyError([f"not valid {fmt.upper()}: {e}"], source) from None


def read_vocabulary_file(path_or_uri: str | os.PathLike) -> Vocabulary:
    """Read a YAML (.yaml, .yml) or JSON (.json) vocabulary from a local path or an ``s3://`` URI.

    Raises:
        FileNotFoundError: nothing at that location.
        VocabularyError: wrong extension, unparsable, or invalid content (every problem listed).
    """
    suffix = PurePosixPath(str(path_or_uri)).suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise VocabularyError([f"vocabulary file must end in .yaml, .yml or .json, got {suffix or 'no suffix'}"],
                              str(path_or_uri))
    if not storage.is_s3(path_or_uri):
        return Vocabulary.load(path_or_uri)
    source = str(path_or_uri)
    return Vocabulary.from_dict(_parse(storage.read_text(source), suffix.lstrip(".").replace("yml", "yaml"),
                                       source), source=source)


def check_against_checkpoint(vocabulary: Vocabulary, checkpoint_uri: str, word_vectors_uri: str | None = None
                             ) -> list[str]:
    """Model-dependent problems of ``vocabulary`` for a checkpoint (vector dimension, unresolvable words).

    ``from_dict`` checks what a file alone can show; this adds what needs the model. Empty means fine.
    """
    from sarl.model.serving import vocabulary_problems  # heavy (torch model code); only push --checkpoint needs it

    word_vectors = load_vectors(word_vectors_uri) if word_vectors_uri else None
    return vocabulary_problems(vocabulary, node_cache.local_copy(checkpoint_uri), word_vectors)


class VocabStore:
    """The store at ``uri``: see the module docstring for its layout.

    Concurrent pushes of the same new version from two machines are not arbitrated (S3 has no
    create-if-absent here); pushes are rare, human-driven events.
    """

    def __init__(self, uri: str | os.PathLike, fail_fast: bool = False) -> None:
        self.uri = str(uri).rstrip("/") if storage.is_s3(uri) else str(uri)
        self.fail_fast = fail_fast  # reads on S3 give up in seconds (Serve's watcher retries on its own schedule)

    def _version_uri(self, version: str) -> str:
        return storage.join(self.uri, _VERSIONS, f"{check_version(version)}.json")

    def pointer(self) -> dict | None:
        """The content of ``CURRENT.json`` (version, updated_at, fingerprint); None before the first push."""
        uri = storage.join(self.uri, _POINTER)
        try:
            text = storage.read_text(uri, fail_fast=self.fail_fast)
        except FileNotFoundError:
            return None
        try:
            pointer = json.loads(text)
        except json.JSONDecodeError as e:
            raise VocabStoreError(f"{uri} is not valid JSON: {e}") from None
        if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
            raise VocabStoreError(f"{uri} has no 'version' string: {text[:200]!r}")
        return pointer

    def current_version(self) -> str | None:
        """The version the pointer names; None when the store has no pointer yet."""
        pointer = self.pointer()
        return pointer["version"] if pointer else None

    def _known(self) -> dict[str, float]:
        """Pushed versions with their push times; stray files (temp files, other names) are ignored."""
        files = _mtimes(storage.join(self.uri, _VERSIONS))
        return {n[:-5]: t for n, t in files.items() if n.endswith(".json") and VERSION_PATTERN.fullmatch(n[:-5])}

    def _unknown(self, version: str) -> VocabStoreError:
        known = sorted(self._known(), key=_natural)
        return VocabStoreError(f"no version {version!r} in {self.uri} (known: {', '.join(known) or 'none'})")

    def _read(self, version: str) -> Any:
        uri = self._version_uri(version)
        try:
            text = storage.read_text(uri, fail_fast=self.fail_fast)
        except FileNotFoundError:
            raise self._unknown(version) from None
        return _parse(text, "json", uri)

    def load(self, version: str | None = None) -> Vocabulary:
        """The vocabulary of ``version`` (None: the current one).

        Raises:
            VocabStoreError: unknown version, an empty store, or a current version whose file changed
                after it was pushed (its fingerprint no longer matches the pointer's).
            VocabularyError: the stored file is invalid (written into the store by hand).
        """
        pointer = self.pointer() if version is None else None
        if version is None and pointer is None:
            raise VocabStoreError(f"{self.uri} has no current version; push one with `sarl vocab push`")
        name = version if version is not None else pointer["version"]
        uri = self._version_uri(name)
        vocabulary = Vocabulary.from_dict(self._read(name), source=uri)
        if vocabulary.version != name:
            raise VocabularyError([f"version {vocabulary.version!r} does not match the file name {name!r}"], uri)
        if pointer is not None and pointer.get("fingerprint") not in (None, vocabulary.fingerprint()):
            raise VocabStoreError(f"{uri} changed after it was pushed (fingerprint differs from {_POINTER}); "
                                  "versions are immutable: push the change as a new version")
        return vocabulary

    def versions(self, trained_names: Sequence[str] | None = None) -> list[VersionInfo]:
        """Every pushed version, oldest push first; ``zero_shot`` counts names absent from ``trained_names``.

        Category counts come from the raw files, so one broken hand-written version does not hide the list.
        """
        current = self.current_version()
        trained = {n.strip().casefold() for n in trained_names} if trained_names is not None else None
        out = []
        for version, mtime in sorted(self._known().items(), key=lambda kv: (kv[1], _natural(kv[0]))):
            try:
                data = self._read(version)
            except VocabularyError:  # not even JSON: listed with 0 categories, `load` says what is wrong
                data = {}
            cats = data.get("categories") if isinstance(data, dict) else None
            cats = cats if isinstance(cats, list) else []
            names = [c if isinstance(c, str) else c.get("name") if isinstance(c, dict) else None for c in cats]
            zero_shot = None if trained is None else sum(
                not (isinstance(n, str) and n.strip().casefold() in trained) for n in names)
            out.append(VersionInfo(version, len(cats), zero_shot, _iso(mtime), version == current))
        return out

    def push(self, vocabulary: Vocabulary, make_current: bool = True) -> str:
        """Publish ``vocabulary`` as version ``vocabulary.version`` and (by default) point the store at it.

        Re-pushing identical content is allowed and only moves the pointer; other content under an
        existing version is refused, since replicas and clients identify a vocabulary by its version.
        """
        vocabulary.validate()
        version = check_version(vocabulary.version)
        uri = self._version_uri(version)
        if storage.exists(uri):
            try:
                same = Vocabulary.from_dict(self._read(version)).fingerprint() == vocabulary.fingerprint()
            except VocabularyError:
                same = False
            if not same:
                raise VocabStoreError(f"version {version} already exists with other content; versions are "
                                      "immutable, push it as a new version")
        else:
            storage.write_text(uri, json.dumps(vocabulary.to_dict(), indent=2, ensure_ascii=False) + "\n")
        if make_current:
            self._point(version, vocabulary.fingerprint())
        return version

    def set_current(self, version: str) -> None:
        """Point the store at an existing version: the rollback (and roll-forward) primitive."""
        self._point(version, self.load(check_version(version)).fingerprint())

    def _point(self, version: str, fingerprint: str) -> None:
        pointer = {"version": version, "updated_at": _iso(datetime.now(timezone.utc).timestamp()),
                   "fingerprint": fingerprint}
        storage.write_text(storage.join(self.uri, _POINTER), json.dumps(pointer) + "\n")
