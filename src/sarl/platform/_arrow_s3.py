"""Arrow's S3 filesystem, with a retry strategy that survives pickling.

Ray pickles ``RunConfig(storage_filesystem=...)`` into the Train controller, every worker and Tune's
``tuner.pkl``. ``pyarrow.fs.S3FileSystem.__reduce__`` rebuilds the filesystem from its options but leaves the
retry strategy out, so every copy falls back to Arrow's default of 3 attempts (about 2.5 s against a closed
port). The controller's writes (``checkpoint_manager_snapshot.json``) have no retry of Ray's own around them, so
an endpoint that dropped out for a few seconds ended the run with a ``ControllerError``.
"""

from __future__ import annotations

from typing import Any

import pyarrow.fs


class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
    """``S3FileSystem`` with ``AwsStandardS3RetryStrategy(max_attempts)``, kept in every pickled copy."""

    def __init__(self, *, max_attempts: int, **options: Any) -> None:
        super().__init__(retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options)
        self.max_attempts = max_attempts

    def __reduce__(self):
        _, (options,) = super().__reduce__()  # Arrow's own options, credentials as Arrow chooses to keep them
        return _rebuild, (self.max_attempts, options)


def _rebuild(max_attempts: int, options: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts=max_attempts, **options)
