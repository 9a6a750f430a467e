"""Which vocabulary a Serve replica serves: the watcher that follows the store, and the limits a version must meet.

A replica starts on its checkpoint's vocabulary and follows the store's ``CURRENT.json`` (or a pinned version).
What can go wrong falls in two kinds, handled differently:

- **the store cannot be read** (connection refused, timeouts, throttling, 5xx): nothing is remembered against the
  version; the watcher retries with exponential backoff (from the poll interval, doubling, up to
  ``max_retry_interval_s``) and loads the version as soon as the store answers, without another push. A replica
  that starts, or is reconfigured, while the store is down does not fail: it serves what it has (the checkpoint's
  vocabulary, or the last version it loaded) and reports the outage;
- **the version is bad** (invalid file, content that differs from the pointer's fingerprint, over the limits,
  categories the model cannot serve, a build that raises, an out-of-memory error included): the version (with the
  pointer's fingerprint) is remembered and never rebuilt on later polls; a new push, a rollback, or a pin moves on.

Either way the previous vocabulary keeps serving and ``state()["last_error"]`` says what happened, with a *kind*
and the version only: the full message (store URIs, exception text) goes to the replica's log, not to clients.

Staging a push (the fleet never sees a version before one replica built it)::

    sarl vocab push new.yaml --store S --no-current     # stored, not current: no replica of the fleet loads it
    # a canary application (same config, another name and route, 1 replica) pins it: user_config
    #   vocabulary_version: <new>; check its /v1/vocabulary (last_error null) and its predictions
    sarl vocab rollback <new> --store S                 # release: the pointer moves, every replica follows
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ...model.prompts import tokenize
from ...model.serving import BoundVocabulary
from ...model.vocabulary import Vocabulary, VocabularyError
from ..vocab_store import VocabStore, VocabStoreError

logger = logging.getLogger("ray.serve")

# last_error kinds, as clients and the sarl_vocabulary_reloads_total metric see them
UNREACHABLE, INVALID, TOO_LARGE, BUILD_FAILED = "store_unreachable", "invalid_version", "too_large", "build_failed"


@dataclass(frozen=True)
class VocabularyLimits:
    """What a served version may hold: a version over them is refused before it is built."""

    max_categories: int = 2000
    max_prompt_tokens: int = 77  # per handcrafted (zero-shot) prompt, start and end tokens included


def limit_problems(vocabulary: Vocabulary, limits: VocabularyLimits, trained: Vocabulary) -> list[str]:
    """Why ``vocabulary`` is over ``limits``; empty when it is within them.

    Only zero-shot categories (no trained name or alias) have their prompt tokenised when the version is built.
    """
    problems = []
    if len(vocabulary.categories) > limits.max_categories:
        problems.append(f"{len(vocabulary.categories)} categories, over the limit of {limits.max_categories}")
    known = {k.strip().casefold() for c in trained.categories for k in (c.name, *c.aliases)}
    for c in vocabulary.categories:
        if any(k.strip().casefold() in known for k in (c.name, *c.aliases)):
            continue
        # tokenize pads to the context length; count the non-zero ids (start and end tokens included)
        tokens = int((tokenize([c.prompt_text()], context_length=1024)[0] != 0).sum())
        if tokens > limits.max_prompt_tokens:
            problems.append(f"{c.name!r}: its prompt has {tokens} tokens, over the limit of "
                            f"{limits.max_prompt_tokens}")
    return problems


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def is_store_failure(error: BaseException) -> bool:
    """Whether ``error`` means the store could not be read (retried) rather than a bad version (remembered)."""
    if isinstance(error, (VocabStoreError, VocabularyError)):
        return False
    if isinstance(error, OSError):  # connection refused, timeouts, a missing local mount
        return True
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    return isinstance(error, (BotoCoreError, ClientError))


class VocabularyWatcher:
    """The bound vocabulary a replica serves, and one ``refresh`` step towards the wanted version.

    ``bind`` builds a :class:`BoundVocabulary` for the replica's model, whose vocabulary is ``trained``.
    ``refresh`` never raises: the watcher thread and ``reconfigure`` call it, and the replica keeps serving
    whatever happens. ``on_outcome`` is told the outcome of every attempt that did something (``loaded`` or an
    error kind), for metrics.
    """

    def __init__(self, store: VocabStore | None, initial: BoundVocabulary, bind: Callable[[Vocabulary], Any],
                 trained: Vocabulary, limits: VocabularyLimits = VocabularyLimits(),
                 on_outcome: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.bound, self.bind, self.limits = store, initial, bind, limits
        self.trained = trained  # the model's vocabulary: categories matching it need no prompt encoded
        self.on_outcome = on_outcome or (lambda outcome: None)
        self.clock = clock
        self.source = "checkpoint"  # where the served version came from: the checkpoint, or the store
        self.last_error: dict[str, Any] | None = None
        self._served: tuple[str, str | None] | None = None  # (version, pointer fingerprint) now served
        self._rejected: dict[tuple[str, str | None], str] = {}  # bad versions -> kind; not rebuilt
        self._failures = 0  # store failures in a row
        self._retry_at = float("-inf")
        self._lock = threading.Lock()  # one refresh at a time (the watcher thread, or reconfigure)

    def state(self) -> dict[str, Any]:
        """What ``GET /v1/vocabulary`` and ``/readyz`` show: nothing of the store's address or of exception text."""
        error = None
        if self.last_error is not None:
            error = {k: self.last_error[k] for k in ("version", "kind", "at")}
            if self.last_error["kind"] == UNREACHABLE:
                error["retry_in_s"] = round(max(0.0, self._retry_at - self.clock()), 1)
        return {"version": self.bound.version, "fingerprint": self.bound.vocabulary.fingerprint(),
                "source": self.source, "follows_store": self.store is not None, "last_error": error}

    def refresh(self, pinned: str | None, poll_interval_s: float, max_retry_interval_s: float,
                force: bool = False) -> str:
        """Load the wanted version (``pinned``, else the pointer's) if it is not served; returns the outcome:
        ``unchanged``, ``loaded``, ``waiting`` (backing off after a store failure) or an error kind.

        ``force`` retries the store now even while backing off (a reconfigure that pins another version).
        """
        if self.store is None:
            return "unchanged"
        with self._lock:
            if not force and self.clock() < self._retry_at:
                return "waiting"
            version, expected = pinned, None
            try:
                if pinned is None:
                    pointer = self.store.pointer()
                    if pointer is None:  # an empty store: the checkpoint's vocabulary serves
                        return self._ok("unchanged")
                    version, expected = pointer["version"], pointer.get("fingerprint")
                key = (version, expected)
                if key == self._served:
                    return self._ok("unchanged")
                if key in self._rejected:
                    return self._rejected[key]
                vocabulary = self.store.load(version)
            except Exception as e:  # noqa: BLE001 - sorted into the two kinds, nothing escapes
                if is_store_failure(e):
                    return self._store_failed(version, e, poll_interval_s, max_retry_interval_s)
                return self._reject((version, expected), INVALID, e)
            if expected is not None and vocabulary.fingerprint() != expected:
                return self._reject(key, INVALID, ValueError(
                    f"the content of version {version} has fingerprint {vocabulary.fingerprint()[:12]}, the "
                    f"pointer says {expected[:12]}: the version file changed after it was pushed"))
            problems = limit_problems(vocabulary, self.limits, self.trained)
            if problems:
                return self._reject(key, TOO_LARGE, ValueError("; ".join(problems)))
            if vocabulary.fingerprint() == self.bound.vocabulary.fingerprint():
                self._served, self.source = key, "store"
                return self._ok("unchanged")
            started = time.perf_counter()
            try:
                bound = self.bind(vocabulary)
            except Exception as e:  # noqa: BLE001 - a model that cannot serve it, a CUDA OOM while building
                return self._reject(key, BUILD_FAILED, e)
            self.bound, self._served, self.source = bound, key, "store"  # the swap: one reference
            logger.info("serving vocabulary version %s (built in %.0f ms)", version,
                        1000 * (time.perf_counter() - started))
            self.on_outcome("loaded")
            return self._ok("loaded")

    def _ok(self, outcome: str) -> str:
        """The wanted version is the one served: no error to report, no backoff."""
        self._failures, self._retry_at, self.last_error = 0, float("-inf"), None
        return outcome

    def _store_failed(self, version: str | None, error: BaseException, poll: float, cap: float) -> str:
        self._failures += 1
        delay = min(cap, poll * 2 ** (self._failures - 1)) * random.uniform(0.8, 1.0)  # jitter: not all at once
        self._retry_at = self.clock() + delay
        self.last_error = {"version": version, "kind": UNREACHABLE, "at": _now(), "message": str(error)}
        logger.warning("vocabulary store unreachable (%d in a row, next try in %.1f s), still serving %s: %s",
                       self._failures, delay, self.bound.version, error)
        self.on_outcome(UNREACHABLE)
        return UNREACHABLE

    def _reject(self, key: tuple[str | None, str | None], kind: str, error: BaseException) -> str:
        self._failures, self._retry_at = 0, float("-inf")
        self._rejected[key] = kind
        self.last_error = {"version": key[0], "kind": kind, "at": _now(), "message": str(error)}
        logger.warning("vocabulary version %s refused (%s), still serving %s: %s", key[0], kind,
                       self.bound.version, error)
        self.on_outcome(kind)
        return kind


__all__ = ["BUILD_FAILED", "INVALID", "TOO_LARGE", "UNREACHABLE", "VocabularyLimits", "VocabularyWatcher",
           "is_store_failure", "limit_problems"]
