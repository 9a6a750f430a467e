"""Word vectors named by a URI (``model.word_vectors`` of a job, ``word_vectors`` of a Serve app).

GloVe and word2vec files (text or binary) are plain numbers and load from anywhere. gensim's native format
(``.kv``, ``.model``) is a Python pickle: loading it runs whatever code the file holds, so one taken from storage
(``s3://``) is refused unless the operator trusts whoever can write there: ``SARL_TRUST_PICKLED_VECTORS=1`` in
the environment of every process that loads it (driver, workers, Serve replicas), or ``trust_pickle=True``.
Local files are the user's own and always load. A built-in name (``glove-6b-50d``) loads from its installed
package: plain numbers, nothing to trust.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..model.vocabulary import is_builtin_word_vectors, load_word_vectors, unpickles
from . import node_cache, storage

if TYPE_CHECKING:
    from gensim.models import KeyedVectors

TRUST_ENV = "SARL_TRUST_PICKLED_VECTORS"


class UntrustedPickleError(storage.StorageError):
    """Word vectors in a pickled format come from storage and nobody said to trust it."""


def trusted(trust_pickle: bool | None = None) -> bool:
    """``trust_pickle`` if given, else whether ``$SARL_TRUST_PICKLED_VECTORS`` is set to a true value."""
    if trust_pickle is not None:
        return trust_pickle
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_trusted(uri: str, trust_pickle: bool | None = None) -> None:
    """Raise ``UntrustedPickleError`` (saying how to convert or opt in) for pickled vectors from storage."""
    if not storage.is_s3(uri) or not unpickles(uri) or trusted(trust_pickle):
        return
    raise UntrustedPickleError(
        f"refusing to load word vectors {uri}: gensim's native format ({Path(uri).suffix}) is a Python pickle, so "
        "loading it from storage runs any code whoever can write there put in it. Convert it once, where the file "
        "is trusted: python -c \"from gensim.models import KeyedVectors; KeyedVectors.load('vectors.kv')"
        ".save_word2vec_format('vectors.bin', binary=True)\", upload vectors.bin and name it instead "
        f"(word2vec binary, GloVe and word2vec text need no trust); or, if you trust that bucket, set {TRUST_ENV}=1 "
        "for every process that loads it (driver, workers, Serve replicas: runtime_env env_vars)")


def local_word_vectors(uri: str, trust_pickle: bool | None = None) -> Path:
    """A local path of the word vectors at ``uri`` (``s3://`` downloaded with gensim's side files, once per node);
    pickled formats from storage are refused before anything is downloaded unless trusted (see the module)."""
    check_trusted(uri, trust_pickle)
    return node_cache.local_copy(uri)


def load(uri: str, trust_pickle: bool | None = None) -> KeyedVectors:
    """The word vectors at ``uri`` (a built-in name, a local path or ``s3://``) as gensim ``KeyedVectors``; see the
    module."""
    if is_builtin_word_vectors(uri):
        return load_word_vectors(uri)
    path = local_word_vectors(uri, trust_pickle)
    return load_word_vectors(path, allow_pickle=not storage.is_s3(uri) or trusted(trust_pickle))


__all__ = ["TRUST_ENV", "UntrustedPickleError", "check_trusted", "load", "local_word_vectors", "trusted"]
