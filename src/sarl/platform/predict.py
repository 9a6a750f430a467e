"""``sarl predict``: label a whole collection on Ray Data, resumable, with the scores Serve gives.

    sarl predict --checkpoint URI --input DIR|s3://prefix|MANIFEST --output PATH|s3://prefix
                 [--vocab-store URI [--vocab-version V]] [--format parquet|jsonl] [--overwrite]

The pipeline: the image paths (a folder or an ``s3://`` prefix, recursively, by image suffix; or a manifest's
``path`` column, relative to the manifest) -> read, decode and resize on CPU tasks (``serve.io.decode_image`` and
the geometric part of the model's transform, as for a request) -> uint8 images -> score in an actor pool that
loads the model once per actor, normalises on its device and scores with ``scoring.ImageScorer``, Serve's code: an
image's scores equal ``POST /v1/predict``'s for the same checkpoint and vocabulary version. The pool
(``ActorPoolStrategy``) starts with ``min_actors`` and grows to ``max_actors`` while images wait; a GPU per actor
when the cluster has or can add GPU nodes (:func:`stage_resources`); beside CPU actors, Ray Data fuses decoding into
them. The driver reads the checkpoint's small files only (model.json, vocabulary.json, digest.txt:
``aliases.identify``); each actor copies the weights on its own node and checks them against the digest. Local
paths are made absolute first, against the caller's directory (the tasks and actors run in others).

The output is a folder of shards, each written whole (S3 PUT, or a local write and rename) once its rows are
scored::

    <output>/part-00000.parquet     path, scores {category: p}, labels (at or above each category's threshold),
                                    vocabulary_version, model_id, model_digest
    <output>/errors-00000.jsonl     {"path", "reason"} for the images of that shard that could not be read
    <output>/summary.json           counts, images/s, the model and vocabulary version
    <output>/thresholds.json        {category: threshold} of that vocabulary version

A rerun with the same output reads the shards present and scores only the images in none of them (resume after
a crash: no duplicate row, no missing one); ``--overwrite`` deletes them first. An errors file counts only once
its shard's rows file exists (it is written first).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ..model.config import ConfigError, section
from . import storage

log = logging.getLogger("sarl.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
FORMATS = ("parquet", "jsonl")
PART, ERRORS, SUMMARY = "part-{:05d}.{}", "errors-{:05d}.jsonl", "summary.json"
RUN = "run.json"  # the model and vocabulary version of the rows, written first: a resumed run must match it
ADDRESS_HELP = "Ray cluster address (default: $RAY_ADDRESS, else a local cluster)"
THRESHOLDS = "thresholds.json"  # {category: threshold} of the version scored under (what `sarl complete` reads)
IMAGES_PER_ACTOR = 1000  # the default pool's growth: an actor's start (a model load) is worth this many images


class PredictError(ValueError):
    """A user error of ``sarl predict``: bad input, mixed output formats."""


@section
class PredictConfig:
    """The options of ``sarl predict``: its flags, and the keys of its ``--config`` file (``jobs/predict.yaml``)."""

    checkpoint: str = Field(description="checkpoint directory, s3:// URI, or alias file")
    input: str = Field(description="image folder, s3:// prefix, or a .jsonl/.csv manifest")
    output: str = Field(description="output folder or s3:// prefix (shards, errors, summary.json)")
    vocab_store: str | None = Field(None, description="score under a vocabulary store's version (default: the "
                                                      "checkpoint's)")
    vocab_version: str | None = Field(None, description="that version (default: the store's current one)")
    format: Literal[FORMATS] = Field("parquet", description="file format of the output shards")
    batch_size: int = Field(32, gt=0, description="images per forward in a scoring actor")
    min_actors: int | None = Field(None, gt=0, description="scoring actors started first, each loads the model "
                                                           "once (default 1)")
    max_actors: int | None = Field(None, gt=0, description="the pool grows to this many while images wait "
                                                           f"(default: one per {IMAGES_PER_ACTOR} images to score)")
    actors: int | None = Field(None, gt=0, description="a pool of fixed size: min_actors = max_actors = this")
    gpus_per_actor: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs or its "
                                                                 "autoscaler declares GPU nodes, else 0")
    cpus_per_actor: float | None = Field(None, ge=0, description="default: 1 on CPU actors, 0 beside a GPU "
                                                                 "(decoding needs the CPUs)")
    decode_cpus: float | None = Field(None, gt=0, description="CPUs per decode task (default: 1; beside CPU actors, "
                                                             "cpus_per_actor: the actors then decode their own)")
    shard_size: int = Field(1000, gt=0, description="rows per output file")
    max_image_pixels: int = Field(100_000_000, gt=0, description="refuse larger images before decoding them")
    overwrite: bool = Field(False, description="delete earlier output first")
    address: str | None = Field(None, description=ADDRESS_HELP)

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("min_actors", self.min_actors), ("max_actors", self.max_actors)) if v is not None}
        if self.actors is not None and any(v != self.actors for v in given.values()):
            raise ConfigError(f"actors: {self.actors} is a pool of fixed size (min_actors = max_actors = actors); "
                              f"it cannot go with {', '.join(f'{k}: {v}' for k, v in given.items())}: give actors, "
                              f"or min_actors and max_actors")
        if self.min_actors and self.max_actors and self.min_actors > self.max_actors:
            raise ConfigError(f"min_actors ({self.min_actors}) is over max_actors ({self.max_actors})")

    def pool(self, images: int) -> tuple[int, int]:
        """(min, max) scoring actors for ``images`` to score: ``actors``, or ``min_actors`` (1) to ``max_actors``
        (default one per ``IMAGES_PER_ACTOR`` images, at least ``min_actors``: a short run starts no idle model)."""
        if self.actors is not None:
            return self.actors, self.actors
        low = self.min_actors or 1
        return low, self.max_actors or max(low, math.ceil(images / IMAGES_PER_ACTOR))


# ------------------------------------------------------------------------------------------------ the inputs
def list_inputs(source: str) -> list[str]:
    """The image paths or URIs of a folder, an ``s3://`` prefix (recursively, by suffix) or a manifest."""
    suffix = PurePosixPath(source).suffix.lower()
    if suffix in (".jsonl", ".csv"):
        return _manifest_paths(source)
    if not storage.is_s3(source) and not Path(source).is_dir():
        raise PredictError(f"--input {source}: not a folder, an s3:// prefix, or a .jsonl/.csv manifest")
    files = [f for f in storage.list_files(source) if PurePosixPath(f).suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise PredictError(f"--input {source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    if storage.is_s3(source):
        return [storage.join(source, f) for f in files]
    return [str(Path(source).resolve() / f) for f in files]


def image_uri(manifest: str, path: str) -> str:
    """Where a manifest row's image is: ``path`` itself if absolute or ``s3://``, else relative to the manifest
    (an ``s3://`` manifest's folder, or a local manifest's resolved folder). Prediction rows are keyed by it."""
    if storage.is_s3(path) or Path(path).is_absolute():
        return path
    if storage.is_s3(manifest):
        return storage.join(manifest.rsplit("/", 1)[0], path)
    return str(Path(manifest).resolve().parent / path)


def _manifest_paths(source: str) -> list[str]:
    from ..model.data.manifest import read_manifest

    if storage.is_s3(source):  # one small file: read here, not kept in the node's cache
        with tempfile.TemporaryDirectory(prefix="sarl-manifest-") as tmp:
            rows = read_manifest(storage.download_file(source, Path(tmp) / PurePosixPath(source).name))
    else:
        rows = read_manifest(Path(source))
    out = [image_uri(source, row.path) for row in rows]
    if not out:
        raise PredictError(f"--input {source}: the manifest lists no image")
    return out


# ------------------------------------------------------------------------------------------------ the output
def _parts(output: str, names: list[str] | None = None) -> dict[int, str]:
    """{shard number: rows file name} of an output folder (``names``: its listing, when already made)."""
    parts = {}
    for name in storage.list_dir(output) if names is None else names:  # empty when the folder is missing
        if name.startswith("part-") and name.count(".") == 1:
            index, fmt = name[5:].split(".")
            if index.isdigit() and fmt in FORMATS:
                parts[int(index)] = name
    return parts


def done_paths(output: str, fmt: str) -> tuple[set[str], set[str], int]:
    """Paths already written (rows, and errors of complete shards), and the next free shard number."""
    parts = _parts(output)
    other = sorted({name.rsplit(".", 1)[1] for name in parts.values()} - {fmt})
    if other:
        raise PredictError(f"{output} holds {other[0]} shards; rerun with --format {other[0]}, or --overwrite")
    rows, errors = set(), set()
    for index, name in parts.items():
        rows |= set(_read_paths(storage.join(output, name), fmt))
        errors_uri = storage.join(output, ERRORS.format(index))
        if storage.exists(errors_uri):
            errors |= {json.loads(line)["path"] for line in storage.read_text(errors_uri).splitlines() if line}
    return rows, errors, (max(parts) + 1 if parts else 0)


def _read_paths(uri: str, fmt: str) -> list[str]:
    data = storage.read_bytes(uri)
    if fmt == "jsonl":
        return [json.loads(line)["path"] for line in data.decode().splitlines() if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data), columns=["path"]).column("path").to_pylist()


def _write_shard(output: str, index: int, rows: list[dict[str, Any]], errors: list[dict[str, str]],
                 fmt: str) -> None:
    """The errors file, then the rows file: the rows file's presence marks the shard complete."""
    if errors:
        storage.write_text(storage.join(output, ERRORS.format(index)),
                           "".join(json.dumps(e) + "\n" for e in errors))
    if fmt == "jsonl":
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        data = buffer.getvalue()
    storage.write_bytes(storage.join(output, PART.format(index, fmt)), data)


def _clear(output: str) -> None:
    for name in storage.list_dir(output):
        if name.startswith(("part-", "errors-")) or name in (SUMMARY, THRESHOLDS, RUN):
            storage.delete(storage.join(output, name))


def _drop_orphan_errors(output: str) -> None:
    """Errors files whose shard never got its rows file (a crash between the two writes)."""
    names = storage.list_dir(output)
    parts = _parts(output, names)
    for name in names:
        if name.startswith("errors-") and name[7:12].isdigit() and int(name[7:12]) not in parts:
            storage.delete(storage.join(output, name))


# ------------------------------------------------------------------------------------------------ the stages
def decode_batch(batch: dict[str, np.ndarray], image_size: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Read and resize a batch of paths (a CPU task, or in a CPU actor: :func:`stage_resources`): ``image``
    (N, 3, S, S) uint8, and ``error`` ("" when the image was read), as a prediction request's image is before its
    normalisation, which the scoring actor does (``transforms.build_geometry`` here, ``build_normalization``
    there: what travels is a quarter of float32's bytes)."""
    from ..model.data.transforms import build_geometry
    from .serve.io import RequestError, decode_image

    geometry = build_geometry(image_size, train=False)
    images, errors = [], []
    for path in batch["path"]:
        try:
            images.append(geometry(decode_image(storage.read_bytes(str(path)), max_pixels, image_size)).numpy())
            errors.append("")
            continue
        except RequestError as e:
            errors.append(e.message)
        except OSError as e:  # unreadable file: gone, permissions, the store
            errors.append(f"cannot read: {type(e).__name__}: {e}")
        images.append(np.zeros((3, image_size, image_size), np.uint8))
    return {"path": batch["path"], "image": np.stack(images), "error": np.array(errors, dtype=object)}


class Score:
    """A scoring actor: the model loaded once (``ImageScorer``), the vocabulary bound once; normalises the uint8
    images on the model's device, then scores them as ``ImageScorer.score`` does (``BoundVocabulary.score``)."""

    def __init__(self, checkpoint: str, resolved: dict[str, str], vocab_store: str | None,
                 vocab_version: str | None, device: str) -> None:
        import torch

        from ..model.data.transforms import build_normalization
        from .serve.scoring import ImageScorer

        self.scorer = ImageScorer(checkpoint, device, resolved=resolved)  # the model the driver identified
        self.normalize = build_normalization(self.scorer.model.config.mean, self.scorer.model.config.std)
        vocabulary = self.scorer.model.vocabulary
        if vocab_store:
            from .vocab_store import VocabStore

            vocabulary = VocabStore(vocab_store).load(vocab_version)
        with torch.no_grad():
            self.bound = self.scorer.bind(vocabulary)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = [i for i, e in enumerate(batch["error"]) if not e]
        probs: list[list[float]] = []
        if ok:
            images = torch.from_numpy(batch["image"][ok])  # a copy: Ray's batch arrays are read-only
            if self.scorer.device.type == "cuda":  # uint8 to the GPU, as Serve's float batches go (score_list)
                images = images.pin_memory().to(self.scorer.device, non_blocking=True)
            with torch.inference_mode():  # not a global switch: this class also runs in the caller's process
                probs = self.bound.score(self.scorer.model, self.normalize(images)).cpu().tolist()
        categories = self.bound.vocabulary.categories
        scores, labels = [None] * len(batch["path"]), [None] * len(batch["path"])
        for i, row in zip(ok, probs):
            enabled = [(c, p) for c, p in zip(categories, row) if c.enabled]
            scores[i] = json.dumps({c.name: round(p, 6) for c, p in enabled})
            labels[i] = json.dumps([c.name for c, p in enabled if p >= c.threshold])
        return {"path": batch["path"], "error": batch["error"], "scores": np.array(scores, dtype=object),
                "labels": np.array(labels, dtype=object)}


# ------------------------------------------------------------------------------------------------ the run
def run_predict(config: PredictConfig) -> dict[str, Any]:
    """Score every image of ``config.input`` not yet in ``config.output``; returns the summary."""
    import ray

    from .aliases import identify
    from .cluster import init_ray

    config = absolute_paths(config)
    paths = list_inputs(config.input)
    if config.overwrite:
        _clear(config.output)
    _drop_orphan_errors(config.output)
    written, failed, shard = done_paths(config.output, config.format)
    pending = [p for p in paths if p not in written and p not in failed]
    # model.json, vocabulary.json, digest.txt: the actors copy the weights on their nodes
    model, model_cfg, checkpoint_vocabulary = identify(config.checkpoint)
    vocabulary = _vocabulary(config, checkpoint_vocabulary)
    version = vocabulary.version
    _check_same_run(config.output, model.digest, version)
    storage.write_text(storage.join(config.output, RUN), json.dumps(
        {"model_id": model.model_id, "model_digest": model.digest, "vocabulary_version": version}) + "\n")
    thresholds = {c.name: c.threshold for c in vocabulary.categories if c.enabled}
    storage.write_text(storage.join(config.output, THRESHOLDS), json.dumps(thresholds, indent=1) + "\n")
    log.info("%d images, %d already written, %d to score", len(paths), len(paths) - len(pending), len(pending))
    started = time.perf_counter()
    new_rows = new_errors = 0
    if pending:
        init_ray(config.address)
        decode_cpus, actors = stage_resources(config, len(pending))
        ds = ray.data.from_items([{"path": p} for p in pending],
                                 override_num_blocks=max(1, min(len(pending) // config.batch_size, 200)))
        ds = ds.map_batches(decode_batch, fn_kwargs={"image_size": model_cfg.image_size,
                                                     "max_pixels": config.max_image_pixels},
                            batch_size=config.batch_size, num_cpus=decode_cpus)
        ds = ds.map_batches(Score, fn_constructor_args=(config.checkpoint, model.resolved(), config.vocab_store,
                                                        version, "cuda" if actors["num_gpus"] > 0 else "cpu"),
                            batch_size=config.batch_size, **actors)
        rows: list[dict[str, Any]] = []
        errors: list[dict[str, str]] = []
        for batch in ds.iter_batches(batch_size=config.batch_size, batch_format="numpy"):
            for path, error, scores, labels in zip(batch["path"], batch["error"], batch["scores"], batch["labels"]):
                if error:
                    errors.append({"path": str(path), "reason": str(error)})
                else:
                    rows.append({"path": str(path), "scores": json.loads(scores), "labels": json.loads(labels),
                                 "vocabulary_version": version, "model_id": model.model_id,
                                 "model_digest": model.digest})
            if len(rows) + len(errors) >= config.shard_size:
                _write_shard(config.output, shard, rows, errors, config.format)
                new_rows, new_errors, shard = new_rows + len(rows), new_errors + len(errors), shard + 1
                rows, errors = [], []
        if rows or errors:
            _write_shard(config.output, shard, rows, errors, config.format)
            new_rows, new_errors = new_rows + len(rows), new_errors + len(errors)
    seconds = time.perf_counter() - started
    summary = {"images": len(paths), "written": len(written) + new_rows, "errors": len(failed) + new_errors,
               "this_run": {"scored": new_rows, "errors": new_errors, "seconds": round(seconds, 2),
                            "images_per_s": round((new_rows + new_errors) / seconds, 2) if seconds > 0 else None},
               "skipped_already_written": len(paths) - len(pending),
               "model": {"id": model.model_id, "digest": model.digest}, "vocabulary_version": version,
               "output": config.output, "format": config.format}
    storage.write_text(storage.join(config.output, SUMMARY), json.dumps(summary, indent=2) + "\n")
    return summary


def absolute_paths(config: PredictConfig) -> PredictConfig:
    """``config`` with its local paths (checkpoint, vocabulary store, input, output) made absolute against this
    process's directory: the decode tasks and scoring actors run in others (the node's, a job's working dir)."""
    from .evaluate import absolute

    return dataclasses.replace(config, **{key: absolute(value) for key in ("checkpoint", "vocab_store", "input",
                                                                          "output")
                                          if (value := getattr(config, key))})


def stage_resources(config: PredictConfig, images: int) -> tuple[float, dict[str, Any]]:
    """The CPUs of a decode task, and the scoring stage's resources for ``images`` to score: a pool of
    ``min_actors`` that grows to ``max_actors`` while images wait (``ActorPoolStrategy``; Ray Data adds actors as
    the cluster can place them), ``gpus_per_actor`` GPUs and ``cpus_per_actor`` CPUs each.

    GPUs by default when the cluster has one, or when its autoscaler declares a node type with GPUs (the cluster
    config an autoscaler reports to the GCS; Ray Data reads the same record): a cluster whose GPU nodes scale from
    zero has none when the run starts, and gets GPU actors all the same, whose pending requests make the autoscaler
    add the nodes. Where the autoscaler reports no such config, ``gpus_per_actor: 1`` does it; ``0`` keeps CPUs.

    Decoding runs in CPU tasks feeding GPU actors (uint8 images through the object store). Beside CPU actors, a
    decode task asks for the actor's CPUs, so Ray Data fuses the two stages: each actor decodes its own batches,
    in its own process (no second process per CPU importing torch, no copy between them), and the pool's size is
    the decoding's concurrency too. A ``decode_cpus`` other than ``cpus_per_actor`` keeps them apart.
    """
    import ray

    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster_gpus() >= 1 else 0.0
    cpus = config.cpus_per_actor if config.cpus_per_actor is not None else (0.0 if gpus > 0 else 1.0)
    decode_cpus = config.decode_cpus or (cpus if gpus == 0 and cpus > 0 else 1.0)
    low, high = config.pool(images)
    return decode_cpus, {"num_gpus": gpus, "num_cpus": cpus,
                         "compute": ray.data.ActorPoolStrategy(min_size=low, max_size=high)}


def cluster_gpus() -> float:
    """GPUs the cluster has now, or at most once its autoscaler has added the node types it declares."""
    import ray

    declared = 0
    try:  # a private API (what Ray Data's autoscaler reads); when it moves, the GPUs present decide
        declared = (ray._private.state.state.get_max_resources_from_cluster_config() or {}).get("GPU", 0)
    except Exception as e:  # noqa: BLE001
        log.debug("no autoscaler cluster config: %s", e)
    return max(float(ray.cluster_resources().get("GPU", 0)), float(declared))


def _vocabulary(config: PredictConfig, checkpoint_vocabulary: Any) -> Any:
    """The vocabulary scored under: the store's version (named, or current) or the checkpoint's own."""
    if config.vocab_store:
        from .vocab_store import VocabStore

        return VocabStore(config.vocab_store).load(config.vocab_version)
    if config.vocab_version:
        raise PredictError("--vocab-version needs --vocab-store")
    return checkpoint_vocabulary


def _check_same_run(output: str, digest: str, version: str) -> None:
    """A resumed output must come from the same model and vocabulary version (else its rows would mix)."""
    uri = storage.join(output, RUN)
    if _parts(output) and storage.exists(uri):
        before = json.loads(storage.read_text(uri))
        if (before["model_digest"], before["vocabulary_version"]) != (digest, version):
            raise PredictError(f"{output} holds rows of model {before['model_id']} under vocabulary "
                               f"{before['vocabulary_version']}, not of this model and version {version}: give "
                               f"another --output, or --overwrite")


def read_rows(output: str, fmt: str = "parquet") -> list[dict[str, Any]]:
    """Every row of every shard of an output folder."""
    rows: list[dict[str, Any]] = []
    for _, name in sorted(_parts(output).items()):
        data = storage.read_bytes(storage.join(output, name))
        if fmt == "jsonl":
            rows += [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        else:
            import pyarrow.parquet as pq

            rows += pq.read_table(io.BytesIO(data)).to_pylist()
    return rows


__all__ = ["PredictConfig", "PredictError", "cluster_gpus", "done_paths", "list_inputs",
           "read_rows", "run_predict", "stage_resources"]
