"""Feature caches on S3: ``cache.root: s3://bucket/prefix`` behind the model library's local ``FeatureCache``.

``sarl.model.features`` knows only local directories. For an S3 root, entries live at ``<root>/<digest>/`` and
each machine keeps a local mirror (under ``node_cache.default_cache_dir()``): a local miss asks S3 (a hit when the
entry is there: it is downloaded into the mirror), and an entry computed here is uploaded. ``meta.json`` is
uploaded last and is what a reader checks for, so a trial never downloads an entry another is still uploading.
An entry already in the mirror is a hit without a request to S3; a failed upload is a warning, not an error.

An entry is computed once per cluster, not once per machine: the machine that computes it holds a lease,
``<root>/<digest>/lease.json``, created with a conditional PUT (only one creator wins) and rewritten every
``LEASE_TTL_S / 4`` while it computes; the others wait for ``meta.json`` (then download the entry) or for the
lease to go stale (its holder died: the first to see that takes it over and computes). Two machines may both
compute an entry only in a narrow race around a stale lease; entries are named by their content, so that costs
time, never correctness.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from ..model.features import ARRAY_FILES, META_FILE, FeatureCache
from . import node_cache, storage

log = logging.getLogger("sarl.feature_store")

LEASE_FILE = "lease.json"
LEASE_TTL_S = 120.0  # a lease not rewritten for this long is stale: its holder died
POLL_S = 2.0  # how often a waiting machine looks for the entry or a stale lease


class S3FeatureStore:
    """The remote level of a ``FeatureCache`` (see ``sarl.model.features.RemoteStore``) under an S3 URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")

    def fetch(self, digest: str, local_dir: Path) -> bool:
        entry = storage.join(self.uri, digest)
        if not storage.exists(storage.join(entry, META_FILE)):
            return False
        # the entry's files, not the folder: its lease may still lie there, and go while a listing names it
        for name in (*ARRAY_FILES, META_FILE):
            storage.download_file(storage.join(entry, name), Path(local_dir) / name)
        return True

    def push(self, digest: str, local_dir: Path) -> None:
        entry = storage.join(self.uri, digest)
        for name in (*ARRAY_FILES, META_FILE):  # meta.json last: it marks the entry complete
            storage.upload_file(Path(local_dir) / name, storage.join(entry, name))

    @contextlib.contextmanager
    def computing(self, digest: str) -> Iterator[None]:
        """Held while this machine computes entry ``digest``; entered once the entry is complete in the store
        (another machine computed it: the caller looks again) or this machine holds the lease (see the module)."""
        entry = storage.join(self.uri, digest)
        lease = storage.join(entry, LEASE_FILE)
        owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}).encode()
        waited = False
        while not storage.create_exclusive(lease, owner):
            if storage.exists(storage.join(entry, META_FILE)):
                yield
                return
            age = _age(lease)
            if age is not None and age > LEASE_TTL_S:
                log.warning("feature cache %s: the lease of the machine computing it is %.0f s old; taking over",
                            digest[:16], age)
                storage.delete(lease)
                continue
            if not waited:
                log.info("feature cache %s: another machine is computing it; waiting for it", digest[:16])
                waited = True
            time.sleep(POLL_S)
        stop = threading.Event()
        renew = threading.Thread(target=_renew, args=(lease, owner, stop), daemon=True, name="feature-lease")
        renew.start()
        try:
            yield
        finally:
            stop.set()
            renew.join()
            with contextlib.suppress(Exception):  # a lease left behind goes stale
                storage.delete(lease)


def _age(uri: str) -> float | None:
    """Seconds since the object at ``uri`` was last written; None when it is gone."""
    head = storage.head_object(*storage.parse_s3(uri))
    if head is None:
        return None
    return (datetime.now(timezone.utc) - head["LastModified"]).total_seconds()


def _renew(lease: str, owner: bytes, stop: threading.Event) -> None:
    while not stop.wait(LEASE_TTL_S / 4):
        try:
            storage.write_bytes(lease, owner)
        except Exception as exc:  # the next renewal may succeed; a lease left stale only lets another compute
            log.warning("feature cache: could not renew the lease %s (%s: %s)", lease, type(exc).__name__, exc)


def local_mirror(uri: str) -> Path:
    """Where this machine keeps its copies of the entries under the S3 root ``uri``."""
    name = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return node_cache.default_cache_dir() / "features" / name


def feature_cache(root: str) -> FeatureCache:
    """The cache for ``cache.root``: a local directory as it is, an ``s3://`` root through a local mirror."""
    if storage.is_s3(root):
        return FeatureCache(local_mirror(root), remote=S3FeatureStore(root))
    return FeatureCache(root)
