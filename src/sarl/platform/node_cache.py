"""The node cache: ``local_copy(uri)`` gives a local path for a local or ``s3://`` URI, downloading S3 objects once
per machine and version into ``$SARL_CACHE_DIR`` (default ``~/.cache/sarl``) and sharing them between the
processes of the node (Train workers, Serve replicas, Data tasks) with file locks; entries nobody uses are evicted
beyond ``$SARL_CACHE_MAX_BYTES``. URI I/O itself is ``storage``.

A URI copied before is looked at here first: one HEAD says whether the copy is current (of the object; of a
checkpoint directory's ``digest.txt``; of a directory's index, ``.sarl-index.json``, which :func:`write_index`
writes, e.g. ``sarl index s3://bucket/coco``; a directory with neither is listed again), and while the store
cannot be reached the copy is used as it is, with a warning, so a worker or replica restarting during an S3 outage
starts from its node's copy instead of failing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from . import storage
from .storage import Uri

log = logging.getLogger("sarl.node_cache")


def default_cache_dir() -> Path:
    """Where ``local_copy`` keeps downloads: ``$SARL_CACHE_DIR`` or ``~/.cache/sarl``."""
    return Path(os.environ.get("SARL_CACHE_DIR") or Path.home() / ".cache" / "sarl") / "s3"


_MANIFEST = "manifest.json"
DIGEST_NAME = "digest.txt"  # a checkpoint's digest of its files: one HEAD of it revalidates the whole copy
INDEX_NAME = ".sarl-index.json"  # a directory's version (write_index): one HEAD of it instead of a listing
_ENTRY_RE = re.compile(r"[0-9a-f]{24}-[0-9a-f]{16}")  # <hash of the URI>-<hash of its objects' ETags>
_STAGING_RE = re.compile(r"\.([0-9a-f]{24}-[0-9a-f]{16})\..+")  # .<entry>.<random>: a download in progress
_TRASH_PREFIX = ".trash-"
# gensim's KeyedVectors.save / Word2Vec.save write large arrays beside the file: <name>.vectors.npy, ...
SIDECAR_SUFFIXES = (".kv", ".model")
_held: dict[str, int] = {}  # use-lock path -> descriptor holding a shared lock until this process exits
_held_lock = threading.Lock()
_scopes = threading.local()  # .stack: a list per open ``holding()`` block of this thread, of the locks it took


def cache_max_bytes() -> int | None:
    """The node cache's bound from ``$SARL_CACHE_MAX_BYTES`` (bytes, or with a K/M/G/T suffix); None: unbounded."""
    text = os.environ.get("SARL_CACHE_MAX_BYTES", "").strip()
    if not text:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", text.lower())
    if not match:
        raise ValueError(f"SARL_CACHE_MAX_BYTES={text!r}: expected a number of bytes, e.g. 200G or 5000000")
    return int(float(match[1]) * 1024 ** " kmgt".index(match[2] or " "))


def _lock(path: Path, mode: int) -> int | None:
    """A descriptor of ``path`` locked with ``flock(mode)``; None when ``mode`` has LOCK_NB and the lock is taken.

    An evictor unlinks the lock files of the entry it removes while it holds them exclusively, so a lock taken on
    a file that is no longer at ``path`` is dropped and taken again on the current one.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)


def _hold(entry: Path) -> None:
    """Mark ``entry`` in use by this process (a shared lock on ``<entry>.use``), until the process exits or, when
    taken inside a :func:`holding` block, until that block ends."""
    path = str(entry) + ".use"
    with _held_lock:
        if path not in _held:
            _held[path] = _lock(Path(path), fcntl.LOCK_SH)
            stack = getattr(_scopes, "stack", None)
            if stack:
                stack[-1].append(path)


@contextlib.contextmanager
def holding() -> Iterator[None]:
    """Keep the entries ``local_copy`` returns inside the block in use only until it ends.

    For the body of a Ray task: its worker process is pooled and runs other tasks afterwards, so a hold kept
    until the process exits would pin the entry against eviction as long as the idle worker lives. Entries the
    process held before the block stay held.
    """
    stack = _scopes.__dict__.setdefault("stack", [])
    stack.append([])
    try:
        yield
    finally:
        taken = stack.pop()
        with _held_lock:
            for path in taken:
                fd = _held.pop(path, None)
                if fd is not None:
                    os.close(fd)  # releases the shared lock


def _published(entry: Path) -> bool:
    return (entry / _MANIFEST).is_file()


def _try_evict(entry: Path) -> bool:
    """Remove ``entry`` and its lock files if no process uses it (its use lock can be taken exclusively without
    waiting); True if it was removed."""
    use = _lock(Path(str(entry) + ".use"), fcntl.LOCK_EX | fcntl.LOCK_NB)
    if use is None:
        return False
    trash = entry.with_name(f"{_TRASH_PREFIX}{uuid.uuid4().hex}")
    try:
        download = _lock(Path(str(entry) + ".lock"), fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            try:
                os.rename(entry, trash)  # atomic: readers see the entry or nothing
                removed = True
            except FileNotFoundError:  # lock files of a download that failed
                removed = False
            os.unlink(str(entry) + ".use")
            if download is not None:
                os.unlink(str(entry) + ".lock")
        finally:
            if download is not None:
                os.close(download)
    finally:
        os.close(use)
    if removed:
        shutil.rmtree(trash, ignore_errors=True)
        pointer = entry.with_name(f"{entry.name.split('-')[0]}.json")  # the URI's pointer, if it names this entry
        try:
            if json.loads(pointer.read_text()).get("entry") == entry.name:
                pointer.unlink()
        except (OSError, ValueError, AttributeError):
            pass
    return removed


def _sweep(cache: Path, current: Path, max_bytes: int | None) -> None:
    """Remove what nobody on this node uses: older versions of ``current``'s URI, the least recently used entries
    beyond ``max_bytes``, and leftovers of killed downloads. ``current`` itself is never removed."""
    try:
        names = os.listdir(cache)
    except FileNotFoundError:
        return
    for name in names:
        staging = _STAGING_RE.fullmatch(name)
        if name.startswith(_TRASH_PREFIX):
            shutil.rmtree(cache / name, ignore_errors=True)
        elif staging:  # a download in progress holds its entry's lock; a killed one left this behind
            fd = _lock(cache / f"{staging[1]}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is not None:
                try:
                    shutil.rmtree(cache / name, ignore_errors=True)
                finally:
                    os.close(fd)
    entries = [cache / n for n in names if _ENTRY_RE.fullmatch(n) and n != current.name]
    orphans = {n[: -len(".use")] for n in names if n.endswith(".use")} - {e.name for e in entries} - {current.name}
    for name in orphans:  # lock files left by failed downloads
        if _ENTRY_RE.fullmatch(name):
            _try_evict(cache / name)
    uri_hash = current.name.split("-")[0]
    kept = [e for e in entries if not (e.name.startswith(uri_hash + "-") and _try_evict(e))]
    if max_bytes is None:
        return
    sizes: list[tuple[float, int, Path]] = []
    for entry in [current, *kept]:
        try:
            sizes.append(((entry / _MANIFEST).stat().st_mtime, json.loads((entry / _MANIFEST).read_text())["bytes"],
                          entry))
        except (OSError, ValueError, KeyError):
            continue  # being removed, or not published yet
    total = sum(size for _, size, _ in sizes)
    for _, size, entry in sorted(sizes, key=lambda s: s[0]):
        if total <= max_bytes:
            break
        if entry != current and _try_evict(entry):
            total -= size


def _pointer(cache: Path, uri: str) -> Path:
    """``<hash of the URI>.json`` (the hash its entries' names start with): the URI's last published entry, and
    the one object whose ETag says whether it is still current (the object itself, or a directory's index or
    ``digest.txt``; none for other directories)."""
    return cache / f"{_uri_hash(uri)}.json"


def _uri_hash(uri: str) -> str:
    """The first part of the names of a URI's entries and of its pointer."""
    return hashlib.sha256(uri.encode()).hexdigest()[:24]


def _current_copy(cache: Path, uri: str, bucket: str, key: str, name: str) -> Path | None:
    """The published entry of ``uri`` on this node if it is still current, checked with one HEAD (a directory
    with neither an index nor ``digest.txt``: one listing), or whatever the store says if it cannot be reached (a
    warning says so). None when there is no entry, or the store has a newer version."""
    try:
        pointer = json.loads(_pointer(cache, uri).read_text())
    except (OSError, ValueError):
        return None
    entry = cache / str(pointer.get("entry", ""))
    if not _ENTRY_RE.fullmatch(entry.name) or not _published(entry):
        return None
    try:
        check = pointer.get("check")
        if check:
            head = storage.head_object(bucket, check["key"], fail_fast=True)
            return entry if head is not None and head["ETag"] == check["etag"] else None
        objects = json.loads((entry / _MANIFEST).read_text())["objects"]
        return entry if _versions(_plan(bucket, key, name, fail_fast=True)[0]) == objects else None
    except Exception as error:  # noqa: BLE001 - only an unreachable store is answered from the copy
        if not storage.is_unreachable(error):
            raise
        log.warning("%s: the store cannot be reached (%s); using this node's copy %s, downloaded %s", uri,
                    type(error).__name__, entry, time.strftime("%Y-%m-%d %H:%M:%S",
                                                               time.localtime((entry / _MANIFEST).stat().st_mtime)))
        return entry


def _versions(plan: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {k: v["etag"] for k, v in plan.items()}


def _plan(bucket: str, key: str, name: str, fail_fast: bool = False
          ) -> tuple[dict[str, dict[str, Any]], dict[str, str] | None]:
    """What ``local_copy`` of ``s3://bucket/key`` downloads (path in the entry -> {key, etag, size}), and the one
    object whose ETag versions it all (``{key, etag}``: the object itself; a directory's index, which is not
    downloaded, or its ``digest.txt``), or None (a file with side files, a directory with neither)."""
    head = storage.head_object(bucket, key, fail_fast=fail_fast)
    if head is not None:
        plan = {name: {"key": key, "etag": head["ETag"], "size": head.get("ContentLength", 0)}}
        if name.endswith(SIDECAR_SUFFIXES):
            for obj in storage.list_objects(bucket, key + ".", fail_fast=fail_fast):
                rest = obj["Key"][len(key) :]
                if "/" not in rest:  # <name>.vectors.npy beside it, not a "directory" <name>.d/...
                    plan[name + rest] = {"key": obj["Key"], "etag": obj["ETag"], "size": obj.get("Size", 0)}
        return plan, ({"key": key, "etag": head["ETag"]} if len(plan) == 1 else None)
    prefix = storage.dir_prefix(key)
    root = Path(name)
    plan, index = {}, None
    for obj in storage.list_objects(bucket, prefix, fail_fast=fail_fast):
        if obj["Key"] == prefix + INDEX_NAME:
            index = {"key": obj["Key"], "etag": obj["ETag"]}
            continue
        plan[storage.safe_destination(root, obj["Key"][len(prefix) :], f"s3://{bucket}/{obj['Key']}").as_posix()] = {
            "key": obj["Key"], "etag": obj["ETag"], "size": obj.get("Size", 0)}
    digest = plan.get(f"{name}/{DIGEST_NAME}")
    return plan, index or ({"key": digest["key"], "etag": digest["etag"]} if digest else None)


def write_index(uri: str) -> dict[str, Any]:
    """Write the index of the ``s3://`` directory ``uri`` (``<uri>/.sarl-index.json``) and return it: the number,
    bytes and version (a digest of every key, ETag and size) of its objects. A node cache holding a copy of the
    directory then revalidates it with one HEAD of the index instead of listing the prefix (a data set: every
    Train worker start, every evaluation task). Rewrite it after changing the directory: a copy stays current as
    long as the index does."""
    if not storage.is_s3(uri):
        raise storage.StorageError(f"{uri}: an index is for an s3:// directory (local paths are read as they are)")
    bucket, key = storage.parse_s3(str(uri).rstrip("/"))
    name = PurePosixPath(key).name or bucket
    plan, _ = _plan(bucket, key, name)  # what a copy holds: the index itself left out
    if name in plan:
        raise storage.StorageError(f"{uri} is a file: an index is for a directory")
    if not plan:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    objects = sorted((path, v["etag"], v["size"]) for path, v in plan.items())
    index = {"version": "sha256:" + hashlib.sha256(json.dumps(objects).encode()).hexdigest(),
             "objects": len(objects), "bytes": sum(size for _, _, size in objects),
             "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_text(f"s3://{bucket}/{storage.dir_prefix(key)}{INDEX_NAME}", json.dumps(index, indent=1) + "\n")
    return index


def local_copy(uri: Uri, cache_dir: Uri | None = None, max_bytes: int | None = None) -> Path:
    """A local path holding the file or directory at ``uri``: local paths as they are, S3 downloaded.

    Downloads land in ``cache_dir/<entry>/<name>``, one entry per URI and version of its objects (their ETags),
    so many processes on one machine asking for the same checkpoint download it once, and a re-uploaded object
    is fetched again into a new entry. A single ``.kv`` / ``.model`` object comes with the files gensim saved
    beside it (``<name>.vectors.npy``, ...).

    Concurrency (processes on one node sharing ``cache_dir``, which must be a local disk: ``flock``):

    - downloaders of one entry are serialised by ``<entry>.lock``; the first downloads into a staging directory
      and renames it into place (atomic), the others then find it published;
    - a published entry is never changed; it is in use from the moment ``local_copy`` returns it in a process
      until that process exits, or until the :func:`holding` block it was asked in ends (a shared lock on
      ``<entry>.use``);
    - entries nobody uses are removed: older versions of the same URI, and the least recently used ones while the
      cache holds more than ``max_bytes`` (default ``$SARL_CACHE_MAX_BYTES``; unset: no bound). An entry is only
      removed by a process that takes its use lock exclusively without waiting, so never while in use.

    A URI copied before is revalidated first (one HEAD when it is a file, or a directory with an index
    (:func:`write_index`) or ``digest.txt``; a listing otherwise; with the fail-fast client); if the store cannot
    be reached then, its last published entry is returned as it is and a warning says so.

    Raises ``FileNotFoundError`` if nothing is at ``uri``, ``StorageError`` for a key that would land outside
    the entry (see :func:`download_dir`).
    """
    if not storage.is_s3(uri):
        return Path(uri)
    uri = str(uri).rstrip("/")
    bucket, key = storage.parse_s3(uri)
    name = PurePosixPath(key).name or bucket
    cache = Path(cache_dir or default_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    current = _current_copy(cache, uri, bucket, key, name)
    if current is not None:
        _hold(current)
        if _published(current):  # not evicted between the check and the hold
            return _used(cache, current, name, max_bytes)
    plan, check = _plan(bucket, key, name)
    if not plan:
        raise FileNotFoundError(uri)
    version = hashlib.sha256(json.dumps(_versions(plan), sort_keys=True).encode())
    entry = cache / f"{_uri_hash(uri)}-{version.hexdigest()[:16]}"
    _hold(entry)  # before looking: an entry seen published then stays
    if not _published(entry):
        fd = _lock(Path(str(entry) + ".lock"), fcntl.LOCK_EX)
        try:
            if not _published(entry):  # nobody finished it while this process waited
                staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=cache))
                try:
                    storage.run_parallel(lambda item: storage.download_file(f"s3://{bucket}/{item[1]['key']}",
                                                                            staging / item[0]), list(plan.items()))
                    manifest = {"uri": uri, "objects": {k: v["etag"] for k, v in plan.items()},
                                "bytes": sum(v["size"] for v in plan.values())}
                    (staging / _MANIFEST).write_text(json.dumps(manifest))
                    try:
                        os.rename(staging, entry)
                    except OSError as error:  # published meanwhile (not by a holder of the lock): keep that one
                        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _published(entry):
                            raise
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        finally:
            os.close(fd)
    if check is None and name not in plan:  # a directory
        log.info("%s: a directory without %s: each use lists its %d objects to revalidate the copy (sarl index "
                 "%s writes one)", uri, INDEX_NAME, len(plan), uri)
    pointer = _pointer(cache, uri)
    staged = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex}")
    staged.write_text(json.dumps({"entry": entry.name, "check": check}))
    os.replace(staged, pointer)  # whole or not at all: other processes read it without a lock
    return _used(cache, entry, name, max_bytes)


def _used(cache: Path, entry: Path, name: str, max_bytes: int | None) -> Path:
    try:
        os.utime(entry / _MANIFEST)  # last use, for the eviction order
    except OSError:
        pass
    _sweep(cache, entry, max_bytes if max_bytes is not None else cache_max_bytes())
    return entry / name
