"""Label Studio's ML backend protocol end to end: a real Label Studio server (the session's ``label_studio``)
connects the session's Serve app (``local_app``) through its own API, asks it for predictions of a local-files
image and an ``s3://`` one (moto), and stores them; what it stores equals ``POST /v1/predict``'s answer for the
same images. The app fetches only from the Label Studio host and its allowed bucket, and never shows the token.

The session's apps get their ``label_studio`` Serve args when they deploy (``serving.label_studio_args``: the
session server's URL and ``serving.LABEL_STUDIO_BUCKET``). The token reaches the replicas the way an operator
gives it, in their environment: the session's Ray cluster (``ray_cluster`` in conftest.py) starts with
``LABEL_STUDIO_API_KEY`` set, and its processes inherit it.
"""

from __future__ import annotations

import json
import uuid

import boto3
import httpx
import pytest
import requests

from sarl.platform.annotate import entries_config, images_config

from serving import CARDS, LABEL_STUDIO_BUCKET, png, post_image, replica_logs

pytestmark = pytest.mark.integration

def served(app_url: str, image: bytes) -> tuple[dict, dict]:
    """``/v1/predict``'s answer for ``image`` and the served categories' thresholds."""
    answer = post_image(app_url, image).json()
    vocabulary = requests.get(f"{app_url}/v1/vocabulary", timeout=10).json()
    assert vocabulary["version"] == answer["vocabulary_version"]  # no push in between
    return answer, {c["name"]: c["threshold"] for c in vocabulary["categories"]}


def test_label_studio_connects_the_app_and_stores_the_served_scores(label_studio, local_app, s3_server):
    ls = httpx.Client(base_url=label_studio.url, headers={"Authorization": f"Token {label_studio.token}"},
                      timeout=60)
    backend = f"{local_app.url}/label-studio"
    health = requests.get(f"{backend}/health", timeout=10).json()
    assert health["status"] == "UP" and health["label_studio_url"] == label_studio.url
    assert health["token_configured"] is True

    # one image under Label Studio's document root (a local-files storage for its folder), one in the allowed bucket
    run = uuid.uuid4().hex[:8]
    folder = label_studio.document_root / f"ml-backend-{run}"
    folder.mkdir()
    local_image, s3_image = png(seed=11), png((64, 48), seed=12)
    (folder / "a.png").write_bytes(local_image)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    if LABEL_STUDIO_BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=LABEL_STUDIO_BUCKET)
    s3.put_object(Bucket=LABEL_STUDIO_BUCKET, Key=f"{run}/b.png", Body=s3_image)
    local_url = f"/data/local-files/?d={folder.name}/a.png"
    s3_url = f"s3://{LABEL_STUDIO_BUCKET}/{run}/b.png"

    def project(title: str, config: str, tasks: list[dict]) -> tuple[int, list[int]]:
        pid = ls.post("/api/projects", json={"title": f"{title}-{run}", "label_config": config}).raise_for_status()
        pid = pid.json()["id"]
        ls.post("/api/storages/localfiles", json={"project": pid, "path": str(folder), "use_blob_urls": True,
                                                   "title": "images"}).raise_for_status()
        ls.post(f"/api/projects/{pid}/import", json=tasks).raise_for_status()
        ids = sorted(t["id"] for t in ls.get("/api/tasks", params={"project": pid}).raise_for_status()
                     .json()["tasks"])
        return pid, ids

    images_pid, (local_task, s3_task) = project("images", images_config(CARDS),
                                                [{"image": local_url}, {"image": s3_url}])

    # Label Studio's own checks when a backend is added (ml/serializers.py): /health, then /setup with the config
    refused = ls.post("/api/ml", json={"project": images_pid, "url": f"{local_app.url}/nothing"})
    assert refused.status_code == 400 and "health check failed" in refused.text
    joker_pid, _ = project("joker", images_config([*CARDS, "joker"]), [{"image": local_url}])
    refused = ls.post("/api/ml", json={"project": joker_pid, "url": backend})
    assert refused.status_code == 400 and "doesn't look like a valid ML backend" in refused.text
    setup = requests.post(f"{backend}/setup", json={"project": f"{joker_pid}.0", "access_token": label_studio.token,
                                                    "schema": images_config([*CARDS, "joker"])}, timeout=10)
    assert setup.status_code == 422 and "['joker']" in setup.json()["error"]  # what Label Studio was told

    connected = ls.post("/api/ml", json={"project": images_pid, "url": backend, "title": "sarl"})
    assert connected.status_code == 201, connected.text
    answer, thresholds = served(local_app.url, local_image)
    version = f"{answer['model']['id']}@vocabulary-{answer['vocabulary_version']}"
    assert connected.json()["model_version"] == version and connected.json()["state"] == "CO"

    # the Data Manager's "Retrieve Predictions" on every task, then what Label Studio stored
    ls.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": images_pid},
            json={"selectedItems": {"all": True, "excluded": []}}).raise_for_status()
    for task, image in ((local_task, local_image), (s3_task, s3_image)):
        (stored,) = ls.get("/api/predictions", params={"task": task}).raise_for_status().json()
        answer, thresholds = served(local_app.url, image)
        ticked = sorted(label["name"] for label in answer["labels"])
        choices = sorted(stored["result"][0]["value"]["choices"]) if stored["result"] else []
        assert choices == ticked, (task, stored, answer)
        if stored["result"]:
            assert stored["result"][0]["from_name"] == "categories" and stored["result"][0]["to_name"] == "image"
        margin = min(abs(answer["scores"][c] - thresholds[c]) for c in CARDS)
        assert stored["score"] == pytest.approx(margin, abs=1e-6) and stored["model_version"] == version

    # entries mode, pre-annotated as the labelling UI opens the task (GET /api/tasks/<id>)
    entries_pid, (entry_task,) = project("entries", entries_config(),
                                         [{"image": local_url, "category": "king", "path": "a.png"}])
    ls.post("/api/ml", json={"project": entries_pid, "url": backend, "title": "sarl"}).raise_for_status()
    opened = ls.get(f"/api/tasks/{entry_task}").raise_for_status().json()
    (stored,) = ls.get("/api/predictions", params={"task": entry_task}).raise_for_status().json()
    answer, thresholds = served(local_app.url, local_image)
    assert stored["score"] == answer["scores"]["king"]  # /v1/predict's score, to the digit
    expected = "present" if answer["scores"]["king"] >= thresholds["king"] else "absent"
    assert stored["result"][0]["value"] == {"choices": [expected]} and stored["result"][0]["from_name"] == "answer"
    assert [p["id"] for p in opened["predictions"]] == [stored["id"]]

    # the allow-list through HTTP: another host of this machine (moto's), another bucket; JSON errors naming each
    tasks = [{"id": 1, "data": {"image": f"{s3_server}/{LABEL_STUDIO_BUCKET}/{run}/b.png"}},
             {"id": 2, "data": {"image": f"s3://other-bucket/{run}/b.png"}},
             {"id": 3, "data": {"image": f"/data/local-files/?d={folder.name}/gone.png"}}]
    refused = requests.post(f"{backend}/predict", json={"tasks": tasks, "label_config": images_config(CARDS)},
                            timeout=30)
    assert refused.status_code == 403 and refused.json()["request_id"]
    assert {d["task"]: d["status"] for d in refused.json()["detail"]} == {1: 403, 2: 403, 3: 404}

    # the token is in no answer and in no replica log line
    answers = [health, setup.json(), refused.json(), requests.get(f"{backend}/versions", timeout=10).json(),
               requests.post(f"{backend}/webhook", json={"action": "PROJECT_UPDATED"}, timeout=10).json()]
    assert label_studio.token not in json.dumps(answers)
    assert label_studio.token not in replica_logs("local")
