"""``sarl annotate push | pull``: send what to annotate next to Label Studio, and take the answers back.

**Push** (:func:`run_push`) turns ``sarl complete --suggest N``'s CSV (``path, category, score, threshold``, paths
relative to the manifest) or ``sarl predict``'s output folder into Label Studio tasks with pre-annotations
(``predictions`` whose ``model_version`` is the model id), in a project whose labelling config is generated from
the vocabulary:

- ``entries`` (default): one task per (image, category), a present / absent / can't-tell question (control
  ``answer``), imported in order of margin ``|score - threshold|``, so Label Studio's sequential sampling shows the
  least settled entries first; the prediction's score is the model's probability.
- ``images``: one task per image, the whole vocabulary as a multiple choice (control ``categories``), pre-ticked
  where the score reaches its threshold; the prediction's score is the image's smallest margin.

Label Studio reaches the images the way users serve them: a local image through its local-files storage (the
image must lie under the server's ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``, in a sub-folder: a local-files
storage connection is created for that sub-folder, the task names ``/data/local-files/?d=<path relative to the
root>``); an ``s3://`` image through an S3 storage connection for its bucket (endpoint and credentials of this
process: ``AWS_ENDPOINT_URL``, boto3's credential chain), the task naming the ``s3://`` URI. Each task also keeps
``path``, the image's URI as ``sarl predict`` keys it, which is what a pull matches against the manifest. A
task is identified by its image and category (entries) or its image (images): pushing again creates no
duplicate, and a project whose config is not the generated one is refused (an images-mode project gains new
categories, never loses any).

**Pull** (:func:`run_pull`) reads every task of the project through the export API and writes a manifest like
``sarl complete``'s output (``path, labels, unknown, entries``) in which exactly the answered entries become
known: ``{"state": 1 | 0, "source": "annotated", "annotator": email, "annotated_at": time, "task": id}``. "can't
tell" stays unknown; an images-mode answer makes every category of the project known for that image (ticked
present, others absent); the latest submitted annotation of a task counts (skipped ones do not). An entry that is
already annotated in the input manifest (``source: annotated``, or any entry a plain manifest states) is never
overwritten: where the answer differs it is listed in ``<output>-conflicts.csv`` and the manifest's value is kept.
A task whose image is not in the manifest, or an answer naming a category outside the manifest's vocabulary, is
an error naming the task, and nothing is written; the output is written whole or not at all (a local file is
written beside its target and renamed, an S3 PUT is atomic).
"""

from __future__ import annotations

import csv
import io
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from pydantic import Field

from ..model.config import section
from . import storage
from .complete import Scored, margin_order
from .label_studio import LabelStudio
from .predict import RUN, THRESHOLDS, image_uri, read_rows

MODES = ("entries", "images")
ANSWERS = {"present": 1, "absent": 0, "can't tell": -1}
ANSWER_CONTROL, CATEGORIES_CONTROL = "answer", "categories"
DOCUMENT_ROOT_ENV = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
LOCAL_FILES_URL = "/data/local-files/?d="


class AnnotateError(ValueError):
    """Bad input to ``sarl annotate``: a one-line message naming the task, image, category or project."""


@section
class AnnotatePushConfig:
    """The options of ``sarl annotate push``: its flags, and the keys of its ``--config`` file."""

    label_studio: str = Field(description="Label Studio's URL, e.g. http://localhost:8080")
    project: str = Field(description="the project's title (created when missing)")
    suggestions: str | None = Field(None, description="sarl complete --suggest's CSV (path, category, score, "
                                                      "threshold)")
    predictions: str | None = Field(None, description="sarl predict's output folder (instead of --suggestions)")
    mode: Literal[MODES] = Field("entries", description="entries: one present/absent/can't-tell question per "
                                                       "(image, category); images: one multiple choice per image")
    manifest: str | None = Field(None, description="the manifest the suggestions' paths are relative to (default: "
                                                   "the suggestions file's folder)")
    model_version: str | None = Field(None, description="the predictions' model_version (default: the model id "
                                                        "of the predictions' run.json)")
    limit: int | None = Field(None, gt=0, description="push only the N tasks with the smallest margins")
    document_root: str | None = Field(None, description=f"Label Studio's local-files document root (default: "
                                                        f"${DOCUMENT_ROOT_ENV}); local images must lie under it")


@section
class AnnotatePullConfig:
    """The options of ``sarl annotate pull``: its flags, and the keys of its ``--config`` file."""

    label_studio: str = Field(description="Label Studio's URL, e.g. http://localhost:8080")
    project: str = Field(description="the project's title")
    manifest: str = Field(description="the manifest the tasks were pushed from (.jsonl/.csv, local or s3://)")
    output: str = Field(description="the manifest with the answers (.jsonl); conflicts beside it")


# ------------------------------------------------------------------------------------------------ configs
def entries_config() -> str:
    """The labelling config of an entries-mode project (one question per image and category)."""
    choices = "".join(f"<Choice value={quoteattr(a)}/>" for a in ANSWERS)
    return (f'<View><Image name="image" value="$image"/><Header value="$category"/>'
            f'<Choices name="{ANSWER_CONTROL}" toName="image" choice="single" showInline="true">{choices}'
            f'</Choices></View>')


def images_config(categories: list[str]) -> str:
    """The labelling config of an images-mode project: the vocabulary as one multiple choice."""
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in categories)
    return (f'<View><Image name="image" value="$image"/>'
            f'<Choices name="{CATEGORIES_CONTROL}" toName="image" choice="multiple">{choices}</Choices></View>')


@dataclass(frozen=True)
class ProjectKind:
    mode: str
    categories: tuple[str, ...]  # images mode: the choices; entries mode: empty


def parse_config(label_config: str, project: str) -> ProjectKind:
    """What a project's labelling config asks: entries or images mode, and its categories; an error naming the
    project when it is neither (edited by hand, or another tool's project)."""
    def mismatch(why: str) -> AnnotateError:
        return AnnotateError(f"project {project!r}: its labelling config does not match the vocabulary: {why}")

    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as exc:
        raise mismatch(f"not XML ({exc})") from None
    controls = {c.get("name"): [v.get("value") for v in c.iter("Choice")] for c in root.iter("Choices")}
    if ANSWER_CONTROL in controls:
        if sorted(controls[ANSWER_CONTROL]) != sorted(ANSWERS):
            raise mismatch(f"its {ANSWER_CONTROL!r} choices are {controls[ANSWER_CONTROL]}, not {list(ANSWERS)}")
        return ProjectKind("entries", ())
    if CATEGORIES_CONTROL in controls:
        return ProjectKind("images", tuple(controls[CATEGORIES_CONTROL]))
    raise mismatch(f"it has no Choices named {ANSWER_CONTROL!r} (entries) or {CATEGORIES_CONTROL!r} (images)")


# ------------------------------------------------------------------------------------------------ push inputs
def read_suggestions(uri: str, manifest: str | None = None) -> list[Scored]:
    """``sarl complete --suggest``'s CSV; relative paths resolved against ``manifest`` (default: the CSV's folder)."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise AnnotateError(f"--suggestions {uri}: no such file") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = {"path", "category", "score", "threshold"} - set(reader.fieldnames or ())
    if missing:
        raise AnnotateError(f"{uri}: the header lacks {sorted(missing)} (sarl complete --suggest writes path, "
                            f"category, score, threshold)")
    out = []
    for line, rec in enumerate(reader, start=2):
        try:
            out.append(Scored(image_uri(manifest or uri, rec["path"].strip()), rec["category"].strip(),
                              float(rec["score"]), float(rec["threshold"])))
        except (TypeError, ValueError, AttributeError):
            raise AnnotateError(f"{uri}:{line}: a row needs a path, a category and numeric score and threshold") \
                from None
    return out


def read_predictions(folder: str) -> tuple[list[Scored], list[str], str | None]:
    """``sarl predict``'s output: every (image, category) score, the vocabulary (thresholds.json's order) and the
    model id (run.json)."""
    try:
        thresholds = json.loads(storage.read_text(storage.join(folder, THRESHOLDS)))
    except FileNotFoundError:
        raise AnnotateError(f"--predictions {folder}: no {THRESHOLDS} (is it sarl predict's output?)") from None
    fmt = "jsonl" if any(n.endswith(".jsonl") and n.startswith("part-") for n in storage.list_dir(folder)) \
        else "parquet"
    scored = [Scored(row["path"], name, float(p), float(thresholds[name]))
              for row in read_rows(folder, fmt) for name, p in row["scores"].items() if name in thresholds]
    return scored, list(thresholds), _model_id(storage.join(folder, RUN))


def _model_id(run_json: str) -> str | None:
    try:
        return json.loads(storage.read_text(run_json)).get("model_id")
    except FileNotFoundError:
        return None


def suggestions_model(suggestions: str) -> str | None:
    """The model id of ``sarl complete``'s predictions beside its suggestions (``<out>-suggest.csv`` and
    ``<out>.<suffix>.predictions/run.json``), when they are there."""
    parent, name = (suggestions.rsplit("/", 1) if storage.is_s3(suggestions)
                    else (str(Path(suggestions).parent), Path(suggestions).name))
    stem = name.removesuffix("-suggest.csv")
    for child in storage.list_dir(parent):
        if child.startswith(stem + ".") and child.endswith(".predictions"):
            model = _model_id(storage.join(parent, child, RUN))
            if model:
                return model
    return None


# ------------------------------------------------------------------------------------------------ push tasks
def entry_tasks(scored: list[Scored], refs: dict[str, str], model_version: str) -> list[dict[str, Any]]:
    """One task per (image, category), smallest margin first, pre-answered present / absent by the threshold."""
    tasks = []
    for s in margin_order(scored):
        answer = "present" if s.score >= s.threshold else "absent"
        tasks.append({"data": {"image": refs[s.path], "category": s.category, "score": round(s.score, 6),
                               "threshold": round(s.threshold, 6), "margin": round(s.margin, 6), "path": s.path},
                      "predictions": [{"model_version": model_version, "score": round(s.score, 6),
                                       "result": [_choices(ANSWER_CONTROL, [answer])]}]})
    return tasks


def image_tasks(scored: list[Scored], categories: list[str], refs: dict[str, str],
                model_version: str) -> list[dict[str, Any]]:
    """One task per image, the categories whose score reaches their threshold pre-ticked; least settled first."""
    by_image: dict[str, list[Scored]] = {}
    for s in scored:
        by_image.setdefault(s.path, []).append(s)
    tasks = []
    for path, items in by_image.items():
        ticked = [c for c in categories if any(s.category == c and s.score >= s.threshold for s in items)]
        margin = min(s.margin for s in items)
        tasks.append({"data": {"image": refs[path], "path": path, "margin": round(margin, 6)},
                      "predictions": [{"model_version": model_version, "score": round(margin, 6),
                                       "result": [_choices(CATEGORIES_CONTROL, ticked)] if ticked else []}]})
    tasks.sort(key=lambda t: (t["data"]["margin"], t["data"]["path"]))
    return tasks


def _choices(control: str, values: list[str]) -> dict[str, Any]:
    return {"from_name": control, "to_name": "image", "type": "choices", "value": {"choices": values}}


def task_key(data: dict[str, Any], mode: str) -> tuple[str, ...]:
    """What identifies a task: its image and category (entries), its image (images)."""
    return (str(data.get("path")), str(data.get("category"))) if mode == "entries" else (str(data.get("path")),)


# ------------------------------------------------------------------------------------------------ images
@dataclass
class ImageSources:
    """Where Label Studio finds each image: task data references, and the storage connections they need."""

    refs: dict[str, str]  # image URI -> the task's ``image`` value
    local_dirs: set[str]  # sub-folders of the document root to connect as local-files storages
    buckets: set[str]  # buckets to connect as S3 storages


def image_sources(paths: list[str], document_root: str | None) -> ImageSources:
    """Task references for ``paths`` (local files under ``document_root``, or ``s3://``); an error naming an image
    that has gone or that Label Studio could not serve."""
    out = ImageSources({}, set(), set())
    root = Path(document_root).resolve() if document_root else None
    for path in dict.fromkeys(paths):
        if not storage.exists(path):
            raise AnnotateError(f"image {path} has gone (no such file or object)")
        if storage.is_s3(path):
            out.refs[path] = path
            out.buckets.add(storage.parse_s3(path)[0])
            continue
        if root is None:
            raise AnnotateError(f"local image {path}: Label Studio serves local files from its document root; give "
                                f"--document-root (the server's {DOCUMENT_ROOT_ENV})")
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(root) or len(resolved.relative_to(root).parts) < 2:
            raise AnnotateError(f"image {path} is not in a sub-folder of Label Studio's document root {root}: "
                                f"Label Studio can only serve files there")
        rel = resolved.relative_to(root)
        out.refs[path] = LOCAL_FILES_URL + quote(rel.as_posix())
        out.local_dirs.add(str(root / rel.parts[0]))
    return out


def connect_storages(client: LabelStudio, project_id: int, sources: ImageSources) -> int:
    """Create the local-files and S3 storage connections the project lacks; how many were created."""
    created = 0
    have = {s.get("path") for s in client.storages("localfiles", project_id)}
    for folder in sorted(sources.local_dirs - have):
        client.create_storage("localfiles", project_id, path=folder, title=f"sarl {Path(folder).name}",
                              use_blob_urls=False)
        created += 1
    have = {s.get("bucket") for s in client.storages("s3", project_id)} if sources.buckets else set()
    for bucket in sorted(sources.buckets - have):
        client.create_storage("s3", project_id, bucket=bucket, title=f"sarl {bucket}", presign=True,
                              use_blob_urls=False, **_s3_settings())
        created += 1
    return created


def _s3_settings() -> dict[str, str]:
    """This process's S3 endpoint, region and credentials, for Label Studio's S3 storage (which needs them to read
    the objects; they are stored by Label Studio, as its storage form stores them)."""
    import boto3

    session = boto3.Session()
    settings = {"region_name": session.region_name or "us-east-1", "s3_endpoint": storage.resolve_endpoint() or ""}
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        settings.update(aws_access_key_id=frozen.access_key, aws_secret_access_key=frozen.secret_key)
        if frozen.token:
            settings["aws_session_token"] = frozen.token
    return settings


# ------------------------------------------------------------------------------------------------ push
def run_push(config: AnnotatePushConfig, client: LabelStudio) -> dict[str, Any]:
    """Create or update the project, connect the storages, import the tasks it does not hold; returns counts."""
    if bool(config.suggestions) == bool(config.predictions):
        raise AnnotateError("give one of --suggestions (sarl complete --suggest's CSV) or --predictions (sarl "
                            "predict's output)")
    if config.suggestions:
        scored = read_suggestions(config.suggestions, config.manifest)
        categories = sorted({s.category for s in scored})
        model = config.model_version or suggestions_model(config.suggestions)
    else:
        scored, categories, model = read_predictions(config.predictions)
        model = config.model_version or model
    model = model or "unknown"
    label_config = entries_config() if config.mode == "entries" else images_config(categories)
    project = client.find_project(config.project)
    if project is None:
        project = client.create_project(config.project, label_config,
                                        f"sarl annotate push: {config.mode} mode, model {model}")
    else:
        kind = parse_config(project.get("label_config", ""), config.project)
        if kind.mode != config.mode:
            raise AnnotateError(f"project {config.project!r} is an {kind.mode}-mode project, not {config.mode}: "
                                f"give --mode {kind.mode} or another --project")
        if config.mode == "images" and tuple(categories) != kind.categories:
            lost = sorted(set(kind.categories) - set(categories))
            if lost:
                raise AnnotateError(f"project {config.project!r}: its labelling config does not match the "
                                    f"vocabulary: it names {lost}, which the vocabulary lacks")
            client.update_project(project["id"], label_config=label_config)
    existing = {task_key(t.get("data", {}), config.mode) for t in client.export(project["id"])}
    fresh = [s for s in scored if task_key({"path": s.path, "category": s.category}, config.mode) not in existing]
    if config.mode == "entries":
        keep = sorted(fresh, key=lambda s: (s.margin, s.path, s.category))[:config.limit]
    else:
        keep = fresh
    document_root = config.document_root or os.environ.get(DOCUMENT_ROOT_ENV)
    sources = image_sources([s.path for s in keep], document_root)
    storages = connect_storages(client, project["id"], sources)
    tasks = (entry_tasks(keep, sources.refs, model) if config.mode == "entries"
             else image_tasks(keep, categories, sources.refs, model)[:config.limit])
    ids = client.import_tasks(project["id"], tasks)
    return {"project": config.project, "project_id": project["id"], "mode": config.mode, "created": len(ids),
            "already_there": len({task_key({"path": s.path, "category": s.category}, config.mode)
                                  for s in scored} & existing),
            "storages_connected": storages, "model_version": model}


# ------------------------------------------------------------------------------------------------ pull
@dataclass(frozen=True)
class Answer:
    """One answered entry: ``state`` 1 / 0, or -1 for "can't tell"."""

    path: str
    category: str
    state: int
    annotator: str
    annotated_at: str
    task: int


def answers_from_export(tasks: list[dict[str, Any]], kind: ProjectKind, vocabulary: set[str],
                        users: dict[int, str]) -> list[Answer]:
    """The answers of the latest submitted annotation of each task; an error naming the task for a category
    outside ``vocabulary`` or an answer the config does not offer."""
    out = []
    for task in tasks:
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not annotations:
            continue
        latest = max(annotations, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id", 0)))
        data, tid = task.get("data", {}), int(task["id"])
        if not isinstance(data.get("path"), str):
            raise AnnotateError(f"task {tid} has no 'path' in its data: it was not pushed by sarl annotate push")
        who = latest.get("completed_by")
        who = who.get("email") if isinstance(who, dict) else users.get(who, str(who))
        when = latest.get("updated_at") or latest.get("created_at") or ""
        control = ANSWER_CONTROL if kind.mode == "entries" else CATEGORIES_CONTROL
        chosen = [v for r in latest.get("result") or [] if r.get("from_name") == control
                  for v in (r.get("value") or {}).get("choices", [])]
        if kind.mode == "entries":
            category = str(data.get("category"))
            if category not in vocabulary:
                raise AnnotateError(f"task {tid}: category {category!r} is not in the manifest's vocabulary")
            if not chosen:
                continue  # submitted without an answer
            if len(chosen) > 1 or chosen[0] not in ANSWERS:
                raise AnnotateError(f"task {tid}: answer {chosen} is not one of {list(ANSWERS)}")
            out.append(Answer(data["path"], category, ANSWERS[chosen[0]], who, when, tid))
            continue
        for name in chosen:
            if name not in kind.categories or name not in vocabulary:
                raise AnnotateError(f"task {tid}: category {name!r} is not in the "
                                    f"{'project' if name not in kind.categories else 'manifest'}'s vocabulary")
        out += [Answer(data["path"], c, int(c in chosen), who, when, tid) for c in kind.categories]
    return out


def read_lines(manifest: str) -> list[dict[str, Any]]:
    """A manifest's rows as dicts, ``entries`` kept (a JSONL from ``sarl complete`` or an earlier pull)."""
    from ..model.data.manifest import read_manifest
    from . import node_cache

    local = Path(node_cache.local_copy(manifest) if storage.is_s3(manifest) else manifest)
    if not local.is_file():
        raise AnnotateError(f"--manifest {manifest}: no such file")
    rows = read_manifest(local)  # checks every line, names a bad one
    raw = ([json.loads(line) for line in local.read_text().splitlines() if line.strip()]
           if local.suffix.lower() == ".jsonl" else [{} for _ in rows])
    return [{"path": r.path, "labels": r.labels, "unknown": r.unknown,
             **({"entries": x["entries"]} if isinstance(x.get("entries"), dict) else {})} for r, x in zip(rows, raw)]


def vocabulary_of(lines: list[dict[str, Any]]) -> list[str]:
    """Every category a manifest names (in ``entries``, ``labels`` or ``unknown``), sorted."""
    return sorted({n for line in lines for n in (*line.get("entries", {}), *line["labels"], *line["unknown"])})


def current_entry(line: dict[str, Any], category: str) -> dict[str, Any]:
    """A row's entry for ``category``: its ``entries`` record, else what a plain manifest states (listed present,
    listed unknown, else absent: both annotated)."""
    if category in line.get("entries", {}):
        return dict(line["entries"][category])
    if category in line["unknown"]:
        return {"state": -1, "source": "unknown"}
    return {"state": 1 if category in line["labels"] else 0, "source": "annotated"}


def merge_answers(lines: list[dict[str, Any]], keys: list[str], answers: list[Answer],
                  vocabulary: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """The rows with the answers applied (never over an annotated entry), the conflicts, and counts."""
    index = {key: i for i, key in enumerate(keys)}
    entries = [{c: current_entry(line, c) for c in (*line.get("entries", {}), *vocabulary)} for line in lines]
    conflicts: list[dict[str, Any]] = []
    counts = {"answers": len(answers), "became_known": 0, "cant_tell": 0, "agreed": 0, "conflicts": 0}
    for a in answers:
        entry = entries[index[a.path]][a.category]
        if a.state == -1:
            counts["cant_tell"] += 1
        elif entry.get("source") == "annotated":
            if entry["state"] == a.state:
                counts["agreed"] += 1
            else:
                counts["conflicts"] += 1
                conflicts.append({"path": lines[index[a.path]]["path"], "category": a.category,
                                  "manifest_state": entry["state"], "annotated_state": a.state,
                                  "annotator": a.annotator, "annotated_at": a.annotated_at, "task": a.task})
        else:
            counts["became_known"] += entry["state"] == -1
            entries[index[a.path]][a.category] = {"state": a.state, "source": "annotated", "annotator": a.annotator,
                                                  "annotated_at": a.annotated_at, "task": a.task,
                                                  **({"score": entry["score"]} if entry.get("score") is not None
                                                     else {})}
    out = []
    for line, row in zip(lines, entries):
        out.append({"path": line["path"], "labels": [c for c, e in row.items() if e["state"] == 1],
                    "unknown": [c for c, e in row.items() if e["state"] == -1], "entries": row})
    return out, conflicts, counts


def conflicts_path(output: str) -> str:
    """``<output without suffix>-conflicts.csv``, beside the output."""
    suffix = PurePosixPath(output).suffix  # string surgery: a Path of s3://b/k would fold the // into one
    return (output[: -len(suffix)] if suffix else output) + "-conflicts.csv"


def run_pull(config: AnnotatePullConfig, client: LabelStudio) -> dict[str, Any]:
    """Read the project's answers, write the merged manifest and its conflict report; returns counts. Nothing is
    written unless every task reads cleanly."""
    if not config.output.endswith(".jsonl"):
        raise AnnotateError(f"--output {config.output}: the merged manifest is JSONL (end it with .jsonl)")
    lines = read_lines(config.manifest)
    vocabulary = vocabulary_of(lines)
    project = client.find_project(config.project)
    if project is None:
        raise AnnotateError(f"Label Studio at {client.url} has no project titled {config.project!r}")
    kind = parse_config(project.get("label_config", ""), config.project)
    extra = sorted(set(kind.categories) - set(vocabulary))
    if extra:
        raise AnnotateError(f"project {config.project!r}: its labelling config does not match the vocabulary: it "
                            f"names {extra}, which {config.manifest} lacks")
    tasks = client.export(project["id"])
    answers = answers_from_export(tasks, kind, set(vocabulary), client.users())
    keys = [image_uri(config.manifest, line["path"]) for line in lines]
    known = set(keys)
    for a in answers:
        if a.path not in known:
            raise AnnotateError(f"task {a.task}: image {a.path} is not in {config.manifest}")
    merged, conflicts, counts = merge_answers(lines, keys, answers, vocabulary)
    report = io.StringIO()
    fields = ["path", "category", "manifest_state", "annotated_state", "annotator", "annotated_at", "task"]
    writer = csv.DictWriter(report, fieldnames=fields)
    writer.writeheader()
    writer.writerows(conflicts)
    storage.write_text(conflicts_path(config.output), report.getvalue())
    storage.write_text(config.output, "".join(json.dumps(line) + "\n" for line in merged))
    counts.update(tasks=len(tasks), unknown_before=sum(len(line["unknown"]) for line in lines),
                  unknown_after=sum(len(line["unknown"]) for line in merged), output=config.output,
                  conflicts_file=conflicts_path(config.output))
    return counts


__all__ = ["ANSWERS", "AnnotateError", "AnnotatePullConfig", "AnnotatePushConfig", "Answer", "ProjectKind",
           "Scored", "answers_from_export", "entries_config", "entry_tasks", "image_sources", "image_tasks",
           "images_config", "merge_answers", "parse_config", "read_lines", "read_predictions", "read_suggestions",
           "run_pull", "run_push", "vocabulary_of"]
