"""The labelling loop against a real Label Studio server (the session's ``label_studio`` fixture): push what to
annotate (local files and ``s3://`` on moto), push again without duplicates, answer through Label Studio's API as
an annotator would, pull, and the manifest that comes back has fewer unknown entries; and every bad input a user
can give gets one line and exit 2, with nothing written.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from sarl.cli import main

from label_studio_server import Annotator

CATEGORIES = ["circle", "square", "triangle"]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def _image(path: Path, i: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), COLOURS[i % len(COLOURS)]).save(path)
    return path.read_bytes()


def _sarl(capsys, *argv: str) -> tuple[int, str]:
    """Run ``sarl`` in this process; its exit code and everything it printed."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def ls_env(label_studio, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.delenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", raising=False)
    return label_studio


@pytest.fixture
def collection(ls_env) -> Path:
    """Six images and a partially labelled manifest in a sub-folder of Label Studio's document root."""
    folder = ls_env.document_root / f"collection-{uuid.uuid4().hex[:8]}"
    for i in range(6):
        _image(folder / "img" / f"{i}.png", i)
    rows = [{"path": f"img/{i}.png", "labels": ["circle"] if i % 2 else [], "unknown": ["square", "triangle"]}
            for i in range(6)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _suggest(folder: Path, rows: list[tuple[str, str, float, float]]) -> Path:
    """A suggestions CSV as ``sarl complete --suggest`` writes it."""
    path = folder / "completed-suggest.csv"
    path.write_text("path,category,score,threshold\n" + "".join(f"{p},{c},{s},{t}\n" for p, c, s, t in rows))
    return path


def test_local_loop_push_twice_answer_pull(ls_env, collection, capsys):
    url, root = ls_env.url, str(ls_env.document_root)
    suggestions = _suggest(collection, [("img/0.png", "square", 0.45, 0.5), ("img/1.png", "triangle", 0.6, 0.5),
                                        ("img/2.png", "square", 0.3, 0.5), ("img/3.png", "triangle", 0.52, 0.5),
                                        ("img/1.png", "circle", 0.35, 0.5)])  # annotated present in the manifest
    push = ["annotate", "push", "--label-studio", url, "--project", "shapes loop", "--suggestions", str(suggestions),
            "--document-root", root, "--model-version", "tiny-0123"]
    code, out = _sarl(capsys, *push)
    assert code == 0, out
    assert "5 tasks created, 0 already there; 1 storage connections added" in out
    code, out = _sarl(capsys, *push)  # the same suggestions again: nothing new
    assert code == 0 and "0 tasks created, 5 already there; 0 storage connections added" in out, out

    annotator = Annotator(url, ls_env.token)
    tasks = annotator.tasks("shapes loop")
    assert len(tasks) == 5
    # smallest margin first, each with the model's pre-annotation
    assert [(t["data"]["path"].rsplit("/", 2)[-2:], t["data"]["category"]) for t in tasks] == [
        (["img", "3.png"], "triangle"), (["img", "0.png"], "square"), (["img", "1.png"], "triangle"),
        (["img", "1.png"], "circle"), (["img", "2.png"], "square")]
    prediction = annotator.http.get(f"/api/predictions/{tasks[0]['predictions'][0]}").json()
    assert prediction["model_version"] == "tiny-0123" and prediction["score"] == pytest.approx(0.52)
    assert prediction["result"][0]["value"]["choices"] == ["present"]
    # Label Studio serves the image through its local-files storage
    assert annotator.image_bytes(tasks[1]["id"]) == (collection / "img" / "0.png").read_bytes()

    answers = {"triangle": "present", "square": "absent", "circle": "absent"}
    for task in tasks[:-1]:
        annotator.answer(task["id"], "answer", [answers[task["data"]["category"]]])
    annotator.answer(tasks[-1]["id"], "answer", ["can't tell"])  # img/2 square stays unknown

    m2 = collection / "pulled.jsonl"
    code, out = _sarl(capsys, "annotate", "pull", "--label-studio", url, "--project", "shapes loop", "--manifest",
                      str(collection / "train.jsonl"), "--output", str(m2))
    assert code == 0, out
    assert "3 became known, 1 can't tell, 0 agreed with the manifest, 1 conflicts" in out
    assert "unknown entries 12 -> 9" in out
    rows = [json.loads(line) for line in m2.read_text().splitlines()]
    assert [r["path"] for r in rows] == [f"img/{i}.png" for i in range(6)]
    assert rows[3]["labels"] == ["circle", "triangle"] and rows[3]["unknown"] == ["square"]
    assert rows[0]["labels"] == [] and rows[0]["unknown"] == ["triangle"]
    entry = rows[0]["entries"]["square"]
    assert (entry["state"], entry["source"], entry["annotator"]) == (0, "annotated", "annotator@sarl.test")
    assert entry["annotated_at"].startswith("20") and entry["task"] == tasks[1]["id"]
    assert rows[2]["unknown"] == ["square", "triangle"]  # can't tell
    assert rows[1]["labels"] == ["circle", "triangle"]  # the manifest's annotated circle kept
    conflicts = (collection / "pulled-conflicts.csv").read_text().splitlines()
    assert conflicts[1:] == [f"img/1.png,circle,1,0,annotator@sarl.test,{conflicts[1].split(',')[5]},"
                             f"{tasks[3]['id']}"]

    # training reads it as any manifest
    from sarl.model.data import build_dataset

    ds = build_dataset("manifest", m2, "train", categories=CATEGORIES)
    assert int((ds.labels == -1).sum()) == 9
    np.testing.assert_array_equal(ds.labels[3], [1, -1, 1])
    for written in collection.iterdir():
        assert not written.is_file() or ls_env.token not in written.read_text(errors="replace"), written

    # the project's JSON export, as Label Studio's "Export" gives it, is a data set of its own (data.kind)
    export = collection / "export.json"
    export.write_text(json.dumps(annotator.tasks("shapes loop")))
    ds = build_dataset("label_studio", export, "train", categories=CATEGORIES, image_root=root)
    assert [Path(p).name for p in ds.image_paths] == ["3.png", "0.png", "1.png", "2.png"]
    np.testing.assert_array_equal(ds.labels, [[-1, -1, 1], [-1, 0, -1], [0, -1, 1], [-1, -1, -1]])


def test_s3_images_mode_from_predictions(ls_env, s3_bucket, capsys):
    """``s3://`` images reach Label Studio through its S3 storage on moto's endpoint; the manifest, the
    predictions and the pulled manifest are on S3 too."""
    s3 = boto3.client("s3")
    local = ls_env.document_root / f"s3-src-{uuid.uuid4().hex[:8]}"
    uris = []
    for i in range(3):
        data = _image(local / f"{i}.png", i)
        s3.put_object(Bucket=s3_bucket, Key=f"photos/{i}.png", Body=data)
        uris.append(f"s3://{s3_bucket}/photos/{i}.png")
    manifest = "".join(json.dumps({"path": f"photos/{i}.png", "labels": [], "unknown": CATEGORIES}) + "\n"
                       for i in range(3))
    s3.put_object(Bucket=s3_bucket, Key="train.jsonl", Body=manifest.encode())
    # sarl predict's output: shards of path / scores, thresholds.json, run.json
    scores = [{"circle": 0.9, "square": 0.2, "triangle": 0.55}, {"circle": 0.1, "square": 0.8, "triangle": 0.3},
              {"circle": 0.5, "square": 0.4, "triangle": 0.1}]
    part = "".join(json.dumps({"path": u, "scores": s, "labels": [], "vocabulary_version": "v1",
                               "model_id": "tiny-s3", "model_digest": "d"}) + "\n" for u, s in zip(uris, scores))
    for key, body in {"part-00000.jsonl": part, "run.json": json.dumps({"model_id": "tiny-s3"}),
                      "thresholds.json": json.dumps({"circle": 0.5, "square": 0.5, "triangle": 0.5})}.items():
        s3.put_object(Bucket=s3_bucket, Key=f"pred/{key}", Body=body.encode())

    code, out = _sarl(capsys, "annotate", "push", "--label-studio", ls_env.url, "--project", "shapes s3",
                      "--predictions", f"s3://{s3_bucket}/pred", "--mode", "images")
    assert code == 0 and "3 tasks created" in out and "model tiny-s3" in out, out
    annotator = Annotator(ls_env.url, ls_env.token)
    tasks = annotator.tasks("shapes s3")
    assert [t["data"]["path"] for t in tasks] == [uris[2], uris[0], uris[1]]  # image 2's circle is on its threshold
    storages = annotator.http.get("/api/storages/s3", params={"project": annotator.project("shapes s3")["id"]}).json()
    assert [(s["bucket"], s["s3_endpoint"]) for s in storages] == [(s3_bucket, boto3.client("s3").meta.endpoint_url)]
    assert annotator.image_bytes(tasks[1]["id"]) == (local / "0.png").read_bytes()  # fetched by LS from moto
    prediction = annotator.http.get(f"/api/predictions/{tasks[1]['predictions'][0]}").json()
    assert prediction["result"][0]["value"]["choices"] == ["circle", "triangle"]

    annotator.answer(tasks[1]["id"], "categories", ["circle"])  # image 0: circle only
    code, out = _sarl(capsys, "annotate", "pull", "--label-studio", ls_env.url, "--project", "shapes s3",
                      "--manifest", f"s3://{s3_bucket}/train.jsonl", "--output", f"s3://{s3_bucket}/pulled.jsonl")
    assert code == 0 and "unknown entries 9 -> 6" in out, out
    rows = [json.loads(line) for line in
            s3.get_object(Bucket=s3_bucket, Key="pulled.jsonl")["Body"].read().decode().splitlines()]
    assert rows[0]["labels"] == ["circle"] and rows[0]["unknown"] == []
    assert rows[1]["unknown"] == CATEGORIES
    report = s3.get_object(Bucket=s3_bucket, Key="pulled-conflicts.csv")["Body"].read().decode()
    assert report.splitlines() == ["path,category,manifest_state,annotated_state,annotator,annotated_at,task"]


def test_bad_input_gets_one_line_and_nothing_written(ls_env, collection, capsys, tmp_path):
    import label_studio_server

    url, root = ls_env.url, str(ls_env.document_root)
    manifest = str(collection / "train.jsonl")
    suggestions = _suggest(collection, [("img/0.png", "square", 0.45, 0.5), ("img/1.png", "square", 0.6, 0.5)])
    push = ["annotate", "push", "--project", "shapes bad", "--suggestions", str(suggestions), "--document-root", root]
    m2 = collection / "m2.jsonl"
    pull = ["annotate", "pull", "--project", "shapes bad", "--manifest", manifest, "--output", str(m2)]

    # a wrong URL, a wrong token (which no message repeats)
    dead = f"http://127.0.0.1:{label_studio_server.free_port()}"
    code, out = _sarl(capsys, *push, "--label-studio", dead)
    assert code == 2 and out.startswith(f"sarl annotate: cannot reach Label Studio at {dead}"), out
    code, out = _sarl(capsys, *push, "--label-studio", url, "--token", "wrong-token-4f8a")
    assert code == 2 and "refused the given token (401" in out and "wrong-token-4f8a" not in out, out

    # an image that has gone: refused before any task is created
    (collection / "img" / "1.png").rename(collection / "img" / "1.moved")
    code, out = _sarl(capsys, *push, "--label-studio", url)
    assert code == 2 and f"image {collection / 'img' / '1.png'} has gone" in out, out
    (collection / "img" / "1.moved").rename(collection / "img" / "1.png")
    assert _sarl(capsys, *push, "--label-studio", url)[0] == 0

    annotator = Annotator(url, ls_env.token)
    first, second = annotator.tasks("shapes bad")
    annotator.answer(first["id"], "answer", ["present"])
    # a task naming a category the manifest lacks, and one whose image the manifest does not hold
    pid = annotator.project("shapes bad")["id"]
    body = annotator.http.post(f"/api/projects/{pid}/import", params={"return_task_ids": "true"},
                               json=[{"data": {**first["data"], "category": "zebra"}}]).json()
    (zebra,) = body["task_ids"]
    annotator.answer(zebra, "answer", ["present"])
    code, out = _sarl(capsys, *pull, "--label-studio", url)
    assert code == 2 and f"task {zebra}: category 'zebra' is not in the manifest's vocabulary" in out, out
    annotator.http.delete(f"/api/tasks/{zebra}").raise_for_status()
    elsewhere = str(tmp_path / "other.png")
    body = annotator.http.post(f"/api/projects/{pid}/import", params={"return_task_ids": "true"},
                               json=[{"data": {**first["data"], "path": elsewhere}}]).json()
    (stray,) = body["task_ids"]
    annotator.answer(stray, "answer", ["absent"])
    code, out = _sarl(capsys, *pull, "--label-studio", url)
    assert code == 2 and f"task {stray}: image {elsewhere} is not in {manifest}" in out, out
    annotator.http.delete(f"/api/tasks/{stray}").raise_for_status()

    # Label Studio going down in the middle of the export a pull reads
    proxy = label_studio_server.CuttingProxy(url)
    try:
        code, out = _sarl(capsys, *pull, "--label-studio", proxy.url)
    finally:
        proxy.close()
    assert code == 2 and f"Label Studio at {proxy.url} stopped answering during GET /api/projects/" in out, out
    assert "/export" in out
    assert not m2.exists() and not (collection / "m2-conflicts.csv").exists()
    assert _sarl(capsys, *pull, "--label-studio", url)[0] == 0 and m2.exists()  # the same pull, server up

    # a project whose labelling config is not ours, or of the other mode
    annotator.http.post("/api/projects", json={"title": "shapes foreign", "label_config": (
        '<View><Image name="image" value="$image"/><Choices name="species" toName="image">'
        '<Choice value="owl"/></Choices></View>')}).raise_for_status()
    for argv in (push, pull):
        code, out = _sarl(capsys, *argv[:2], "--label-studio", url, "--project", "shapes foreign", *argv[4:])
        assert code == 2 and "project 'shapes foreign': its labelling config does not match the vocabulary" in out
    code, out = _sarl(capsys, *push, "--label-studio", url, "--mode", "images")
    assert code == 2 and "is an entries-mode project, not images" in out, out
