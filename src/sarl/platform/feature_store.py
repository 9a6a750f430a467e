"""Feature caches on S3: ``cache.root: s3://bucket/prefix`` behind the model library's local ``FeatureCache``.

``sarl.model.features`` knows only local directories. For an S3 root, entries live at ``<root>/<digest>/`` and
each machine keeps a local mirror (under ``node_cache.default_cache_dir()``): a local miss asks S3 (a hit when the
entry is there: it is downloaded into the mirror), and an entry computed here is uploaded. ``meta.json`` is
uploaded last and is what a reader checks for, so a trial never downloads an entry another is still uploading.
An entry already in the mirror is a hit without a request to S3; a failed upload is a warning, not an error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..model.features import ARRAY_FILES, META_FILE, FeatureCache
from . import node_cache, storage


class S3FeatureStore:
    """The remote level of a ``FeatureCache`` (see ``sarl.model.features.RemoteStore``) under an S3 URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")

    def fetch(self, digest: str, local_dir: Path) -> bool:
        entry = storage.join(self.uri, digest)
        if not storage.exists(storage.join(entry, META_FILE)):
            return False
        storage.download_dir(entry, local_dir)
        return True

    def push(self, digest: str, local_dir: Path) -> None:
        entry = storage.join(self.uri, digest)
        for name in (*ARRAY_FILES, META_FILE):  # meta.json last: it marks the entry complete
            storage.upload_file(Path(local_dir) / name, storage.join(entry, name))


def local_mirror(uri: str) -> Path:
    """Where this machine keeps its copies of the entries under the S3 root ``uri``."""
    name = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return node_cache.default_cache_dir() / "features" / name


def feature_cache(root: str) -> FeatureCache:
    """The cache for ``cache.root``: a local directory as it is, an ``s3://`` root through a local mirror."""
    if storage.is_s3(root):
        return FeatureCache(local_mirror(root), remote=S3FeatureStore(root))
    return FeatureCache(root)
