"""Storage URIs: local paths and ``s3://bucket/key`` behind one small API.

Every artefact the platform reads or writes (data sets, word vectors, checkpoints, vocabularies, run results)
is named by a URI that is either a local path or ``s3://bucket/key``. S3 goes through boto3 and any
S3-compatible store works: the endpoint comes from an explicit argument, ``SARL_S3_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (first set wins). A "directory" on S3 is a key prefix.

Missing locations behave alike for both kinds: reads raise ``FileNotFoundError``, listings of a missing
directory are empty, deleting a missing location does nothing.

Transfers retry throttling and dropped connections (botocore's ``standard`` mode, several attempts);
``check_writable``, the check jobs run before they start, uses a fail-fast client instead. Keys that would land
outside the directory they are downloaded into (``..``, empty or absolute segments) are refused.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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
# Checks before a job starts fail fast on a wrong endpoint or a dead store instead of boto3's minutes of retries.
_FAIL_FAST_CONFIG = Config(connect_timeout=5, read_timeout=30, retries={"mode": "standard", "total_max_attempts": 3})
# Everything else (data sets, checkpoints, uploads) rides out throttling (503 SlowDown) and dropped connections:
# standard mode backs off exponentially (jittered, at most 20 s a wait), so 10 attempts span tens of seconds.
TRANSFER_ATTEMPTS = 10
_TRANSFER_CONFIG = Config(connect_timeout=10, read_timeout=60,
                          retries={"mode": "standard", "total_max_attempts": TRANSFER_ATTEMPTS})
_TRANSFER_THREADS = 8
_MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}

_clients: dict[tuple[str | None, int, bool], Any] = {}
_clients_lock = threading.Lock()


class StorageError(RuntimeError):
    """A storage location cannot be reached or written (missing bucket, bad endpoint, no credentials)."""


BASE_DIR_VAR = "SARL_BASE_DIR"


def local_path(path: Uri) -> Path:
    """A local path as the user meant it, absolute (``~`` expanded): a relative one is taken relative to
    ``$SARL_BASE_DIR`` when that is set, else to the working directory.

    ``ray job submit --working-dir .`` runs its entrypoint in Ray's temporary copy of that directory, without
    what ``.gitignore`` leaves out (``runs/``), and deletes it later: a relative path there named files that are
    not there, and outputs that vanished. There, without ``$SARL_BASE_DIR``, a relative path is refused
    (``StorageError``); the jobs' documented lines set it to the submitter's directory (``env SARL_BASE_DIR="$PWD"``
    in the entrypoint, expanded by the submitter's shell), which is right when the cluster runs on that machine.
    """
    given = Path(path).expanduser()
    if given.is_absolute():
        return given
    base = os.environ.get(BASE_DIR_VAR)
    if base:
        return (Path(base).expanduser() / given).resolve()
    cwd = Path.cwd()
    if {"runtime_resources", "working_dir_files"} <= set(cwd.parts):
        raise StorageError(f"relative path {path}: this command runs in Ray's temporary copy of the job's working "
                           f"directory ({cwd}), which lacks the files .gitignore leaves out and is deleted later; "
                           f"give an absolute path or an s3:// URI, or set {BASE_DIR_VAR} to the directory the "
                           f"paths are relative to (ray job submit ... -- env {BASE_DIR_VAR}=\"$PWD\" sarl ...)")
    return given.resolve()


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


def s3_client(endpoint_url: str | None = None, fail_fast: bool = False) -> Any:
    """A boto3 S3 client for the resolved endpoint, cached per (endpoint, process): clients are not fork-safe.

    The default client retries throttling and connection errors for bulk transfers; ``fail_fast=True`` gives one
    with short timeouts and at most 3 attempts, for checks that should report a dead store in seconds.
    """
    endpoint = resolve_endpoint(endpoint_url)
    key = (endpoint, os.getpid(), fail_fast)
    with _clients_lock:
        if key not in _clients:
            config = _FAIL_FAST_CONFIG if fail_fast else _TRANSFER_CONFIG
            # Path-style addressing: S3-compatible stores (MinIO, moto, Ceph) on a plain host:port need it.
            config = config.merge(Config(s3={"addressing_style": "path"})) if endpoint else config
            # A session per client: boto3's default session is not thread-safe to create clients from.
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        return _clients[key]


def _is_missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in _MISSING_CODES


def dir_prefix(key: str) -> str:
    """The key prefix that holds a "directory" ``key``'s children."""
    return key.rstrip("/") + "/" if key.strip("/") else ""


def list_objects(bucket: str, prefix: str, markers: bool = False, fail_fast: bool = False) -> list[dict[str, Any]]:
    """All objects under ``prefix`` (recursive); directory markers (keys ending in ``/``) only if asked."""
    pages = s3_client(fail_fast=fail_fast).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj for page in pages for obj in page.get("Contents", []) if markers or not obj["Key"].endswith("/")]


def head_object(bucket: str, key: str, fail_fast: bool = False) -> dict[str, Any] | None:
    """The object's metadata, or None when no object has exactly this key."""
    if not key or key.endswith("/"):
        return None
    try:
        return s3_client(fail_fast=fail_fast).head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if _is_missing(error):
            return None
        raise


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the store could not be reached or answered that it is unavailable (connection
    refused, timeouts, 5xx), rather than that the object is missing or access is denied."""
    if isinstance(error, BotoCoreError) and not isinstance(error, NoCredentialsError):
        return True
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or error.response.get("Error", {}).get("Code") in ("SlowDown", "ServiceUnavailable")
    return False


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
    if head_object(bucket, key) is not None:
        return True
    try:
        listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=dir_prefix(key), MaxKeys=1)
    except ClientError as error:
        if _is_missing(error):
            return False
        raise
    return listing.get("KeyCount", 0) > 0


def read_bytes(uri: Uri, fail_fast: bool = False) -> bytes:
    """The whole content of the file at ``uri``; ``FileNotFoundError`` if there is none.

    ``fail_fast``: on S3, short timeouts and 3 attempts (a poller that retries on its own schedule).
    """
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = parse_s3(uri)
    try:
        return s3_client(fail_fast=fail_fast).get_object(Bucket=bucket, Key=key)["Body"].read()
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


def create_exclusive(uri: Uri, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if nothing is there; whether this call created it. One request on S3 (a
    conditional PUT, ``If-None-Match: *``: S3, MinIO and moto refuse it with 412 when the key exists), an
    ``O_EXCL`` open locally: of concurrent callers exactly one gets True."""
    if not is_s3(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(uri, "xb") as fh:
                fh.write(data)
        except FileExistsError:
            return False
        return True
    bucket, key = parse_s3(uri)
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True


def read_text(uri: Uri, encoding: str = "utf-8", fail_fast: bool = False) -> str:
    """The file at ``uri`` decoded as text (``fail_fast``: see :func:`read_bytes`)."""
    return read_bytes(uri, fail_fast=fail_fast).decode(encoding)


def write_text(uri: Uri, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``uri``, replacing it."""
    write_bytes(uri, text.encode(encoding))


def list_dir(uri: Uri) -> list[str]:
    """Sorted names of the immediate children of a directory, like ``os.listdir``; empty if it is missing."""
    if not is_s3(uri):
        path = Path(uri)
        return sorted(os.listdir(path)) if path.is_dir() else []
    bucket, key = parse_s3(uri)
    prefix = dir_prefix(key)
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
    prefix = dir_prefix(key)
    return sorted(obj["Key"][len(prefix) :] for obj in list_objects(bucket, prefix))


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
    keys = [obj["Key"] for obj in list_objects(bucket, dir_prefix(key), markers=True)]
    if head_object(bucket, key) is not None:
        keys.append(key)
    for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        s3_client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


def run_parallel(fn: Callable[[Any], object], items: list[Any]) -> None:
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
    prefix = dir_prefix(key)
    files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    client = s3_client()
    run_parallel(lambda rel: client.upload_file(str(source / rel), bucket, prefix + rel), files)


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


def safe_destination(root: Path, rel: str, key: str) -> Path:
    """``root / rel`` for the object ``key``, refusing names that would land outside ``root``.

    ``rel`` is the key minus the prefix being downloaded. S3 keys are free-form strings: ``..`` climbs out of
    ``root``, an empty segment (``prefix//etc/x``) makes ``rel`` absolute and ``Path`` then drops ``root``.
    """
    parts = rel.split("/")
    if not rel or any(part in ("", ".", "..") for part in parts) or "\0" in rel:
        raise StorageError(f"refusing to download {key!r}: its name under the prefix ({rel!r}) has an empty, "
                           f"'.' or '..' segment or is absolute, so it would be written outside {root}")
    path = root / Path(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise StorageError(f"refusing to download {key!r}: {path} resolves outside {root}")
    return path


def download_dir(uri: Uri, local_dir: Uri) -> Path:
    """Copy a directory tree (on S3: every object under the prefix) into ``local_dir`` and return it.

    Raises ``StorageError`` (naming the key), before anything is written, if a key under the prefix would land
    outside ``local_dir``.
    """
    target = Path(local_dir)
    if not is_s3(uri):
        shutil.copytree(Path(uri), target, dirs_exist_ok=True)
        return target
    bucket, key = parse_s3(uri)
    prefix = dir_prefix(key)
    plan = [(f"s3://{bucket}/{prefix}{rel}", safe_destination(target, rel, f"s3://{bucket}/{prefix}{rel}"))
            for rel in list_files(uri)]
    target.mkdir(parents=True, exist_ok=True)
    run_parallel(lambda item: download_file(*item), plan)
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
    client = s3_client(endpoint, fail_fast=True)
    probe_key = dir_prefix(key) + probe_name
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


def bucket_region(bucket: str, endpoint: str | None = None) -> str:
    """The region ``bucket`` lives in, for clients that do not follow region redirects (Arrow's).

    On AWS (no endpoint override) ``pyarrow.fs.resolve_s3_region`` asks AWS; a custom endpoint (MinIO, moto, Ceph)
    is asked with a HEAD of the bucket (its ``x-amz-bucket-region`` header). Without an answer: ``AWS_DEFAULT_REGION``,
    ``AWS_REGION``, else us-east-1.
    """
    fallback = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    if endpoint is None:
        import pyarrow.fs

        try:
            return pyarrow.fs.resolve_s3_region(bucket)
        except (OSError, ValueError):
            return fallback
    try:
        response = s3_client(endpoint, fail_fast=True).head_bucket(Bucket=bucket)
    except ClientError as error:  # a redirect or a refusal still names the region
        response = error.response
    except BotoCoreError:
        return fallback
    return (response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")) or fallback


def pyarrow_filesystem(uri: Uri) -> tuple[pyarrow.fs.S3FileSystem | None, str]:
    """``(filesystem, path)`` for Ray's ``RunConfig(storage_filesystem=..., storage_path=...)``.

    On S3 the filesystem uses the same endpoint as boto3 here and the bucket's own region (``bucket_region``), and
    the path is ``bucket/prefix`` (Ray wants it without the scheme when a filesystem is given). Credentials are not
    put into it: Arrow's default chain (environment, shared config and profiles, web identity, instance metadata)
    finds them in whichever process uses the filesystem, so a pickled filesystem (Tune's ``tuner.pkl`` in the
    results, the copies Ray sends to workers) holds no secret, and refreshed session tokens are picked up.
    Local paths come back as ``(None, path)`` so Ray uses its default local filesystem.
    """
    if not is_s3(uri):
        return None, str(uri)
    from ._arrow_s3 import RetryingS3FileSystem  # imports pyarrow: heavy, only Ray's storage needs it

    bucket, key = parse_s3(uri)
    endpoint = resolve_endpoint()
    # As many attempts as boto3's transfers here (Arrow's default is 3), in this process and in the copies Ray
    # pickles into its controller and workers: an endpoint that drops out for a few seconds mid-checkpoint is
    # ridden out (about 80 s of backoff before a write fails) instead of failing the run.
    options: dict[str, Any] = {"region": bucket_region(bucket, endpoint), "connect_timeout": 5, "request_timeout": 30}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(scheme=parsed.scheme, endpoint_override=parsed.netloc)
    filesystem = RetryingS3FileSystem(max_attempts=TRANSFER_ATTEMPTS, **options)
    return filesystem, "/".join(p for p in (bucket, key.strip("/")) if p)
