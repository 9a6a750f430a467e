"""A training run's directory, ``<storage_path>/<name>`` (a local path or ``s3://``), and what it holds.

Ray Train writes the checkpoints and its snapshot of them (read here through ``ray.train.Result.from_path``);
``sarl train`` adds beside them::

    <storage_path>/<name>/
        history.jsonl                 one row per epoch, appended once the epoch's checkpoint is in storage
        aliases/<alias>.json          checkpoints published by name (``best``, ``run.alias``; see ``aliases``)
        checkpoint_<time>/job.yaml    in every checkpoint: the job that wrote it (URIs, not node paths)
        checkpoint_<time>/report.json the epoch's history row, to restore a row a failure lost

``Run`` is the one place that knows this layout: training, the resume check and sweeps (ASHA and the results read
each trial's history) go through it. Evaluation, serving and prediction take checkpoint and alias URIs, not runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..model.config import ConfigError, to_dict
from . import storage

if TYPE_CHECKING:
    import ray.train

    from .job import JobConfig

JOB_FILE = "job.yaml"
REPORT_FILE = "report.json"
HISTORY_FILE = "history.jsonl"
# Job fields a rerun may change and still resume the run: how it runs, not what it trains.
RESUME_IGNORED = ("name", "address", "run.name", "run.storage_path", "run.max_failures", "run.keep_checkpoints",
                  "run.fail_once_at_epoch", "run.log_every_epoch", "run.resume", "run.checkpoint_upload", "run.alias",
                  "train.progress", "data.num_workers", "scaling.torch_threads")
log = logging.getLogger("sarl.train")


class Run:
    """The run ``name`` under ``storage_path``: its history, Train's checkpoints, its aliases, the resume check."""

    def __init__(self, storage_path: str, name: str) -> None:
        self.storage_path, self.name = str(storage_path), name
        self.uri = storage.join(self.storage_path, name)

    @classmethod
    def of(cls, job: JobConfig) -> Run:
        return cls(job.run.storage_path, job.run_name)

    def __repr__(self) -> str:
        return f"Run({self.uri!r})"

    def join(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    # ------------------------------------------------------------------------------------ history.jsonl
    @property
    def history_uri(self) -> str:
        return self.join(HISTORY_FILE)

    def history(self) -> list[dict[str, Any]]:
        """Every epoch the run reported, in order (a repeated epoch keeps its last row)."""
        rows = {}
        for row in self._rows():
            rows[row["epoch"]] = row
        return [rows[e] for e in sorted(rows)]

    def append_history(self, row: dict[str, Any]) -> None:
        """One JSON line per epoch: Ray's own table keeps only the checkpoints it kept."""
        previous = storage.read_text(self.history_uri) if storage.exists(self.history_uri) else ""
        storage.write_text(self.history_uri, previous + json.dumps(row) + "\n")

    def reconcile_history(self, epoch: int, checkpoint_dir: Path | None) -> None:
        """Make ``history.jsonl`` hold epochs 1..``epoch`` exactly once when the run (re)starts from the checkpoint
        of ``epoch`` (0 and ``None``: from no checkpoint): the epochs about to be redone lose their rows, and the
        checkpoint's own row comes back if the failure struck between the checkpoint's upload and the row's
        (``report.json`` in the checkpoint).

        A worker can die after an epoch's row is written but before Train commits that epoch's checkpoint (the row
        comes after the upload, the commit after every rank reported), so a restart redoes an epoch the file has;
        or after the commit but before the row. The file is rewritten only when it differs, and the change logged.
        """
        rows = self._rows()
        kept = [row for row in rows if row["epoch"] <= epoch]
        restored = None
        if (checkpoint_dir is not None and not any(row["epoch"] == epoch for row in kept)
                and (checkpoint_dir / REPORT_FILE).is_file()):
            restored = json.loads((checkpoint_dir / REPORT_FILE).read_text())
            kept.append(restored)
        if kept == rows:
            return
        dropped = sorted({row["epoch"] for row in rows if row["epoch"] > epoch})
        log.warning(f"[{self.name}] resuming after epoch {epoch}: history.jsonl "
                    + (f"drops the rows of epochs {dropped}, which are run again" if dropped else "")
                    + (" and " if dropped and restored else "")
                    + (f"gets epoch {epoch}'s row back from its checkpoint" if restored else ""))
        storage.write_text(self.history_uri, "".join(json.dumps(row) + "\n" for row in kept))

    def _rows(self) -> list[dict[str, Any]]:
        text = storage.read_text(self.history_uri) if storage.exists(self.history_uri) else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # ------------------------------------------------------------------------------------ Train's results
    def result(self) -> ray.train.Result | None:
        """Train's committed record of the run (``Result.from_path``: latest and kept checkpoints, their
        metrics), or None while the run has committed no checkpoint."""
        import ray.train

        filesystem, path = storage.pyarrow_filesystem(self.uri)
        if filesystem is None:
            path = str(storage.local_path(path))
        # Reading the snapshot logs, at INFO, advice meant for a controller that restarts the run.
        manager_log = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
        level = manager_log.level
        manager_log.setLevel(logging.WARNING)
        try:
            return ray.train.Result.from_path(path, storage_filesystem=filesystem)
        except RuntimeError:  # no run folder, or no checkpoint_manager_snapshot.json in it yet
            return None
        finally:
            manager_log.setLevel(level)

    def checkpoint_uri(self, checkpoint: ray.train.Checkpoint) -> str:
        """A URI users can pass back to ``sarl evaluate`` / ``sarl serve`` (``s3://`` for S3 storage)."""
        return f"s3://{checkpoint.path}" if storage.is_s3(self.storage_path) else checkpoint.path

    def latest_checkpoint(self) -> tuple[str, dict[str, Any]] | None:
        """``(URI, metrics)`` of the latest committed checkpoint: what a restart or a rerun resumes; or None."""
        result = self.result()
        if result is None or result.checkpoint is None:
            return None
        return self.checkpoint_uri(result.checkpoint), dict(result.metrics or {})

    def stored_job(self) -> tuple[str, dict[str, Any]] | None:
        """``(checkpoint URI, job dict)`` of the latest checkpoint (what a rerun of the name resumes), or None."""
        latest = self.latest_checkpoint()
        if latest is None:
            return None
        try:
            text = storage.read_text(storage.join(latest[0], JOB_FILE))
        except FileNotFoundError:
            return None
        return latest[0], yaml.safe_load(text) or {}

    def check_resume(self, job: JobConfig) -> None:
        """Before a run starts: a run that already has a checkpoint is resumed only as ``run.resume`` allows
        (see ``resume_check``)."""
        found = self.stored_job()
        if found is not None:
            resume_check(job, *found)

    # ------------------------------------------------------------------------------------ aliases
    def publish_aliases(self, checkpoint: str, metrics: dict[str, Any], alias: str | None = None) -> dict[str, str]:
        """Point ``best`` (and ``alias``) at ``checkpoint``; {name: alias file URI}."""
        from .aliases import publish_alias

        model_id = f"{self.name}:epoch-{metrics.get('epoch')}" if "epoch" in metrics else self.name
        kept = {k: metrics[k] for k in ("epoch", "val_mAP", "val_CF1", "val_OF1") if k in metrics}
        return {name: publish_alias(self.uri, name, checkpoint, model_id, kept)
                for name in ["best", *([alias] if alias else [])]}


def resume_check(job: JobConfig, checkpoint: str, stored: dict[str, Any]) -> None:
    """Whether ``job`` may resume the run whose latest checkpoint ``checkpoint`` was written by job ``stored``.

    ``run.resume``: ``auto`` resumes when the stored job is this job (``RESUME_IGNORED`` aside) and raises
    ``ConfigError`` naming every difference otherwise; ``always`` resumes anyway, with a warning naming them;
    ``never`` refuses any existing run.
    """
    where = f"run {job.run_name!r} in {job.run.storage_path}"
    if job.run.resume == "never":
        raise ConfigError(f"{where} already has a checkpoint ({checkpoint}) and run.resume=never: pick a new "
                          "run.name, or run.resume=auto to continue it")
    differences = job_differences(stored, to_dict(job))
    if not differences:
        return
    listed = "\n".join(f"  - {d}" for d in differences)
    if job.run.resume == "always":
        log.warning(f"{where}: resuming {checkpoint} with a changed job (run.resume=always):\n{listed}")
        return
    raise ConfigError(f"{where} already has a checkpoint ({checkpoint}) of a different job:\n{listed}\n"
                      "Pick a new run.name for a new run, or set run.resume=always to continue this one with the "
                      "changed job.")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{dotted.key: leaf}`` (an empty mapping is a leaf)."""
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def job_differences(old: dict[str, Any], new: dict[str, Any], ignored: tuple[str, ...] = RESUME_IGNORED) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs, outside ``ignored`` (and their sub-keys)."""
    a, b = _flat(old), _flat(new)
    missing = object()
    return [f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}" for key in sorted(set(a) | set(b))
            if not any(key == i or key.startswith(i + ".") for i in ignored)
            and a.get(key, missing) != b.get(key, missing)]
