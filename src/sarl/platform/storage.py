"""Storage URIs: local paths and ``s3://bucket/key`` behind one small API.

Every artefact the platform reads or writes (data sets, word vectors, checkpoints, vocabularies, run results)
is named by a URI that is either a local path or ``s3://bucket/key``. S3 goes through boto3 and any
S3-compatible store works: the endpoint comes from an explicit argument, ``SARL_S3_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (first set wins). A "directory" on S3 is a key prefix.

Missing locations behave alike for both kinds: reads raise ``FileNotFoundError``, listings of a missing
directory are empty, deleting a missing location does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ..model._files import write_atomic

if TYPE_CHECKING:
    import pyarrow.fs

Uri = str | os.PathLike

S3_PREFIX = "s3://"
# Fail fast on a wrong endpoint or a dead store instead of boto3's minutes of retries.
_CONFIG = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2})
_TRANSFER_THREADS = 8
_MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}

_clients: dict[tuple[str | None, int], Any] = {}
_clients_lock = threading.Lock()


class StorageError(RuntimeError):
    """A storage location cannot be reached or written (missing bucket, bad endpoint, no credentials)."""


def is_s3(uri: Uri) -> bool:
    """Whether ``uri`` names an S3 object or prefix (``s3://...``) rather than a local path."""
    return str(uri).startswith(S3_PREFIX)


def parse_s3(uri: Uri) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key may be empty (the bucket's root)."""
    text = str(uri)
    if not is_s3(text):
        raise ValueError(f"not an s3:// URI: {text!r}")
    bucket, _, key = text[len(S3_PREFIX) :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {text!r}")
    return bucket, key


def join(uri: Uri, *parts: str) -> str:
    """Append path components to a local path or an S3 URI (always with ``/`` on S3)."""
    parts = tuple(p.strip("/") for p in parts if p.strip("/"))
    if not is_s3(uri):
        return os.path.join(str(uri), *parts)
    return "/".join((str(uri).rstrip("/"), *parts)) if parts else str(uri)


def resolve_endpoint(explicit: str | None = None) -> str | None:
    """The S3 endpoint to use: ``explicit``, else the first of the environment variables set; None is AWS."""
    for value in (explicit, *map(os.environ.get, ("SARL_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"))):
        if value:
            return value
    return None


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client for the resolved endpoint, cached per (endpoint, process): clients are not fork-safe."""
    endpoint = resolve_endpoint(endpoint_url)
    key = (endpoint, os.getpid())
    with _clients_lock:
        if key not in _clients:
            # Path-style addressing: S3-compatible stores (MinIO, moto, Ceph) on a plain host:port need it.
            config = _CONFIG.merge(Config(s3={"addressing_style": "path"})) if endpoint else _CONFIG
            # A session per client: boto3's default session is not thread-safe to create clients from.
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        return _clients[key]


def _is_missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in _MISSING_CODES


def _prefix(key: str) -> str:
    """The key prefix that holds a "directory" ``key``'s children."""
    return key.rstrip("/") + "/" if key.strip("/") else ""


def _objects(bucket: str, prefix: str, markers: bool = False) -> list[dict[str, Any]]:
    """All objects under ``prefix`` (recursive); directory markers (keys ending in ``/``) only if asked."""
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj for page in pages for obj in page.get("Contents", []) if markers or not obj["Key"].endswith("/")]


def _head(bucket: str, key: str) -> dict[str, Any] | None:
    """The object's metadata, or None when no object has exactly this key."""
    if not key or key.endswith("/"):
        return None
    try:
        return s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if _is_missing(error):
            return None
        raise


def exists(uri: Uri) -> bool:
    """Whether a file or a directory (on S3: an object or a non-empty prefix) exists at ``uri``."""
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = parse_s3(uri)
    if not key.strip("/"):
        try:
            s3_client().head_bucket(Bucket=bucket)
            return True
        except ClientError as error:
            if _is_missing(error):
                return False
            raise
    if _head(bucket, key) is not None:
        return True
    try:
        listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=_prefix(key), MaxKeys=1)
    except ClientError as error:
        if _is_missing(error):
            return False
        raise
    return listing.get("KeyCount", 0) > 0


def read_bytes(uri: Uri) -> bytes:
    """The whole content of the file at ``uri``; ``FileNotFoundError`` if there is none."""
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = parse_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if _is_missing(error):
            raise FileNotFoundError(str(uri)) from error
        raise


def write_bytes(uri: Uri, data: bytes) -> None:
    """Write ``data`` to ``uri``, replacing it atomically (readers never see a partial file: S3 PUTs are atomic,
    local files are written beside the target and renamed over it); local parent directories are created."""
    if not is_s3(uri):
        write_atomic(uri, data)
        return
    bucket, key = parse_s3(uri)
    s3_client().put_object(Bucket=bucket, Key=key, Body=data)


def read_text(uri: Uri, encoding: str = "utf-8") -> str:
    """The file at ``uri`` decoded as text."""
    return read_bytes(uri).decode(encoding)


def write_text(uri: Uri, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``uri``, replacing it."""
    write_bytes(uri, text.encode(encoding))


def list_dir(uri: Uri) -> list[str]:
    """Sorted names of the immediate children of a directory, like ``os.listdir``; empty if it is missing."""
    if not is_s3(uri):
        path = Path(uri)
        return sorted(os.listdir(path)) if path.is_dir() else []
    bucket, key = parse_s3(uri)
    prefix = _prefix(key)
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    names: set[str] = set()
    for page in pages:
        names.update(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
        names.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
    names.discard("")  # the directory's own marker object, if a tool wrote one
    return sorted(names)


def list_files(uri: Uri) -> list[str]:
    """Sorted paths (relative, ``/``-separated) of all files under a directory; empty if it is missing."""
    if not is_s3(uri):
        root = Path(uri)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    bucket, key = parse_s3(uri)
    prefix = _prefix(key)
    return sorted(obj["Key"][len(prefix) :] for obj in _objects(bucket, prefix))


def delete(uri: Uri) -> None:
    """Remove a file or a whole directory (on S3: the object and everything under the prefix)."""
    if not is_s3(uri):
        path = Path(uri)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        return
    bucket, key = parse_s3(uri)
    if not key.strip("/"):
        raise ValueError(f"refusing to delete a whole bucket: {uri}")
    keys = [obj["Key"] for obj in _objects(bucket, _prefix(key), markers=True)]
    if _head(bucket, key) is not None:
        keys.append(key)
    for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        s3_client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


def _parallel(fn: Callable[[Any], object], items: list[Any]) -> None:
    """Run ``fn`` over ``items`` on a small thread pool, re-raising the first error."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=min(_TRANSFER_THREADS, len(items))) as pool:
        for _ in pool.map(fn, items):
            pass


def upload_dir(local_dir: Uri, uri: Uri) -> None:
    """Copy a local directory tree to ``uri`` (merging into what is there)."""
    source = Path(local_dir)
    if not source.is_dir():
        raise NotADirectoryError(f"not a directory: {source}")
    if not is_s3(uri):
        shutil.copytree(source, Path(uri), dirs_exist_ok=True)
        return
    bucket, key = parse_s3(uri)
    prefix = _prefix(key)
    files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    client = s3_client()
    _parallel(lambda rel: client.upload_file(str(source / rel), bucket, prefix + rel), files)


def upload_file(local_path: Uri, uri: Uri) -> None:
    """Copy one local file to ``uri`` (on S3 through boto3's transfer manager: multipart for large files)."""
    source = Path(local_path)
    if not source.is_file():
        raise FileNotFoundError(str(source))
    if not is_s3(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, Path(uri))
        return
    bucket, key = parse_s3(uri)
    s3_client().upload_file(str(source), bucket, key)


def download_file(uri: Uri, local_path: Uri) -> Path:
    """Copy one file to ``local_path`` (parents created, replaced atomically) and return that path."""
    target = Path(local_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        shutil.copyfile(Path(uri), target)
        return target
    bucket, key = parse_s3(uri)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        s3_client().download_file(bucket, key, str(partial))
        os.replace(partial, target)
    except ClientError as error:
        if _is_missing(error):
            raise FileNotFoundError(str(uri)) from error
        raise
    finally:
        partial.unlink(missing_ok=True)
    return target


def download_dir(uri: Uri, local_dir: Uri) -> Path:
    """Copy a directory tree (on S3: every object under the prefix) into ``local_dir`` and return it."""
    target = Path(local_dir)
    if not is_s3(uri):
        shutil.copytree(Path(uri), target, dirs_exist_ok=True)
        return target
    target.mkdir(parents=True, exist_ok=True)
    files = list_files(uri)
    _parallel(lambda rel: download_file(join(uri, rel), target / rel), files)
    return target


def default_cache_dir() -> Path:
    """Where ``local_copy`` keeps downloads: ``$SARL_CACHE_DIR`` or ``~/.cache/sarl``."""
    return Path(os.environ.get("SARL_CACHE_DIR") or Path.home() / ".cache" / "sarl") / "s3"


def local_copy(uri: Uri, cache_dir: Uri | None = None) -> Path:
    """A local path holding the file or directory at ``uri``: local paths as they are, S3 downloaded.

    Downloads land in ``cache_dir/<hash of the URI>/<name>`` and are reused while the objects' ETags are
    unchanged, so many workers on one machine asking for the same checkpoint download it once in the
    common case, and a re-uploaded object is fetched again.
    """
    if not is_s3(uri):
        return Path(uri)
    uri = str(uri).rstrip("/")
    bucket, key = parse_s3(uri)
    root = Path(cache_dir or default_cache_dir()) / hashlib.sha256(uri.encode()).hexdigest()[:24]
    target = root / (PurePosixPath(key).name or bucket)
    head = _head(bucket, key)
    if head is not None:
        manifest = {"": head["ETag"]}
    else:
        prefix = _prefix(key)
        manifest = {obj["Key"][len(prefix) :]: obj["ETag"] for obj in _objects(bucket, prefix)}
    if not manifest:
        raise FileNotFoundError(uri)
    marker = root / "manifest.json"

    def cached() -> bool:
        return marker.is_file() and json.loads(marker.read_text()) == manifest

    if cached():
        return target
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        fetch = download_file if head is not None else download_dir
        fetch(uri, staging / target.name)
        (staging / marker.name).write_text(json.dumps(manifest))
        shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(staging, root)
        except OSError:
            if not cached():  # another process won the race with the same content: fine; else a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_writable(uri: Uri, endpoint_url: str | None = None) -> None:
    """Write and delete a probe object at ``uri``, raising ``StorageError`` that says why if that fails.

    Called before long jobs start so that a missing bucket, a wrong endpoint or absent credentials
    show up in seconds, not after the first epoch.
    """
    probe_name = f".sarl-write-check-{uuid.uuid4().hex}"
    if not is_s3(uri):
        try:
            Path(uri).mkdir(parents=True, exist_ok=True)
            probe = Path(uri) / probe_name
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise StorageError(f"cannot write to {uri}: {error}") from error
        return
    bucket, key = parse_s3(uri)
    endpoint = resolve_endpoint(endpoint_url)
    where = f"{uri} (endpoint {endpoint or 'AWS default'})"
    client = s3_client(endpoint)
    probe_key = _prefix(key) + probe_name
    try:
        client.put_object(Bucket=bucket, Key=probe_key, Body=b"")
        client.delete_object(Bucket=bucket, Key=probe_key)
    except NoCredentialsError as error:
        reason = "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)"
        raise StorageError(f"cannot write to {where}: {reason}") from error
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        reason = f"bucket {bucket!r} does not exist" if code == "NoSuchBucket" else f"{code}: {error}"
        raise StorageError(f"cannot write to {where}: {reason}") from error
    except BotoCoreError as error:  # connection refused, timeouts, bad endpoint URL
        raise StorageError(f"cannot reach {where}: {error}") from error


def pyarrow_filesystem(uri: Uri) -> tuple[pyarrow.fs.S3FileSystem | None, str]:
    """``(filesystem, path)`` for Ray's ``RunConfig(storage_filesystem=..., storage_path=...)``.

    On S3 the filesystem uses the same endpoint, region and environment credentials as boto3 here,
    and the path is ``bucket/prefix`` (Ray wants it without the scheme when a filesystem is given).
    Local paths come back as ``(None, path)`` so Ray uses its default local filesystem.
    """
    if not is_s3(uri):
        return None, str(uri)
    import pyarrow.fs  # heavy; only Ray's storage needs it

    bucket, key = parse_s3(uri)
    options: dict[str, Any] = {
        "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        "access_key": os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "session_token": os.environ.get("AWS_SESSION_TOKEN"),
        "connect_timeout": 5,
        "request_timeout": 30,
    }
    endpoint = resolve_endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(scheme=parsed.scheme, endpoint_override=parsed.netloc)
    filesystem = pyarrow.fs.S3FileSystem(**options)
    return filesystem, "/".join(p for p in (bucket, key.strip("/")) if p)
