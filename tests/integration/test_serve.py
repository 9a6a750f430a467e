"""Ray Serve: real HTTP to two replicas, vocabulary pushes served while a client keeps sending, bad input refused.

One app per store kind (a local directory, a bucket on moto's S3 server), each with 2 replicas polling their
store every 0.5 s. The tiny model has random weights: these tests check serving, not accuracy, and compare every
served score with the same checkpoint run in this process.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from sarl.model.checkpoint import checkpoint_digest
from sarl.platform import storage
from sarl.platform.serve import deploy, read_serve_config
from sarl.platform.vocab_store import VocabStore

from serving import (
    CARDS,
    MAX_BODY,
    POLL_S,
    PORT,
    REPO,
    URL,
    App,
    Client,
    expected_scores,
    first_vocabulary,
    png,
    png_claiming,
    post_image,
    replica_logs,
    second_vocabulary,
    vocabulary_of_each_replica,
    wait_for,
)

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------------- predictions
def test_generated_image_scores_match_the_checkpoint(local_app):
    data = png()
    response = requests.post(f"{local_app.url}/v1/predict", data=data, params={"threshold": 0.0}, timeout=30,
                             headers={"Content-Type": "image/png", "X-Request-ID": "client-chosen-id-1"})
    body = response.json()
    assert body["vocabulary_version"] == "1"
    # the model that answered: its checkpoint's digest (of the files), and the id it is known by
    assert body["model"] == {"id": "checkpoint:epoch-7", "digest": checkpoint_digest(local_app.checkpoint)}
    assert body["request_id"] == response.headers["x-request-id"] == "client-chosen-id-1"
    expected = expected_scores(local_app.checkpoint, data)
    assert set(body["scores"]) == set(CARDS)
    for i, name in enumerate(CARDS):
        assert body["scores"][name] == pytest.approx(float(expected[i]), abs=1e-5)
    assert [label["name"] for label in body["labels"]] == sorted(CARDS, key=lambda n: -body["scores"][n])
    assert all(label["zero_shot"] is False and label["threshold"] == 0.0 for label in body["labels"])


def test_real_photos_as_raw_bytes_multipart_and_base64_json(local_app, cards_voc):
    photos = sorted((cards_voc / "test").glob("*.JPG"))[:3]
    for photo in photos:
        data = photo.read_bytes()
        raw = requests.post(f"{local_app.url}/v1/predict", data=data, headers={"Content-Type": "image/jpeg"},
                            params={"top_k": 2}, timeout=30).json()
        form = requests.post(f"{local_app.url}/v1/predict", files={"file": (photo.name, data, "image/jpeg")},
                             params={"top_k": 2}, timeout=30).json()
        as_json = requests.post(f"{local_app.url}/v1/predict", timeout=30,
                                json={"image": base64.b64encode(data).decode(), "top_k": 2}).json()
        assert raw["scores"] == form["scores"] == as_json["scores"] and len(raw["scores"]) == 2
        expected = expected_scores(local_app.checkpoint, data)
        best = sorted(range(len(CARDS)), key=lambda i: -float(expected[i]))[:2]
        assert list(raw["scores"]) == [CARDS[i] for i in best]
        assert all(label["score"] >= 0.5 for label in raw["labels"])  # each category's own threshold


def test_health_readiness_and_vocabulary_endpoints(local_app):
    assert requests.get(f"{local_app.url}/healthz", timeout=5).json()["status"] == "ok"
    ready = requests.get(f"{local_app.url}/readyz", timeout=5).json()
    assert ready["vocabulary_version"] == "1" and ready["vocabulary_source"] == "store"
    assert ready["vocabulary_error"] is None and ready["model"]["digest"].startswith("sha256:")
    body = requests.get(f"{local_app.url}/v1/vocabulary", timeout=5).json()
    assert body["version"] == "1" and body["last_error"] is None and body["poll_interval_s"] == POLL_S
    assert body["source"] == "store" and body["follows_store"] is True
    assert [c["name"] for c in body["categories"]] == CARDS
    assert str(local_app.store.uri) not in json.dumps(body)  # no store address for clients
    missing = requests.get(f"{local_app.url}/v2/nothing", timeout=5)  # JSON, like every error
    assert missing.status_code == 404 and missing.json()["status"] == 404 and missing.json()["request_id"]


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case,status", [
    ("not an image", 400), ("truncated", 400), ("bad base64", 400), ("too large body", 413),
    ("huge dimensions", 413), ("text/plain", 415), ("top_k=0", 422), ("threshold=2", 422),
    ("json top_k string", 422), ("two files", 422),
])
def test_bad_requests_get_their_status_and_the_replica_keeps_serving(local_app, case, status):
    url = f"{local_app.url}/v1/predict"
    image = png()
    send = {
        "not an image": lambda: post_image(local_app.url, b"this is not an image"),
        "truncated": lambda: post_image(local_app.url, image[: len(image) // 2]),
        "bad base64": lambda: requests.post(url, json={"image": "%%%not base64%%%"}, timeout=30),
        "too large body": lambda: post_image(local_app.url, b"\0" * (MAX_BODY + 1)),
        "huge dimensions": lambda: post_image(local_app.url, png_claiming(100_000, 100_000)),
        "text/plain": lambda: requests.post(url, data=image, headers={"Content-Type": "text/plain"}, timeout=30),
        "top_k=0": lambda: post_image(local_app.url, image, top_k=0),
        "threshold=2": lambda: post_image(local_app.url, image, threshold=2),
        "json top_k string": lambda: requests.post(
            url, json={"image": base64.b64encode(image).decode(), "top_k": "all"}, timeout=30),
        "two files": lambda: requests.post(url, files={"a": ("a.png", image), "b": ("b.png", image)}, timeout=30),
    }[case]
    response = send()
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and body["error"]
    if case == "huge dimensions":
        assert "over the limit of 40000000 pixels" in body["error"]
    for _ in range(4):  # both replicas (the router spreads requests) still answer normally
        assert post_image(local_app.url, image).status_code == 200


# ------------------------------------------------------------------------------------------------- hot reload
def check_push_served_by_every_replica(app: App) -> None:
    with Client(app.url) as client:
        wait_for(lambda: len(client.records) >= 12, 15)  # traffic on the old version first
        app.store.push(second_vocabulary())
        pushed = time.monotonic()
        wait_for(lambda: len(client.first_time_each_replica_served("2")) == 2, POLL_S + 10)
        after = len(client.records)
        wait_for(lambda: len(client.records) >= after + 12, 15)  # and on the new one afterwards
    records = client.records
    assert len(records) > 20
    failed = [r for r in records if r[2] != 200]
    assert failed == [], failed[:5]
    assert {r[3] for r in records} == {"1", "2"}
    first_new = client.first_time_each_replica_served("2")
    assert len(first_new) == 2 and all(t - pushed <= POLL_S + 2 for t in first_new.values()), first_new
    # No going back: a request sent after a replica answered with the new version is answered with it.
    went_back = [r for r in records if r[4] in first_new and r[0] > first_new[r[4]] and r[3] != "2"]
    assert went_back == []

    body = post_image(app.url, png(), threshold=0.0).json()
    assert body["vocabulary_version"] == "2"
    assert "nine" not in body["scores"] and {"ace", "joker"} <= set(body["scores"])
    flags = {label["name"]: label["zero_shot"] for label in body["labels"]}
    assert flags["joker"] is True and flags["ace"] is False
    default = post_image(app.url, png()).json()  # per-category thresholds: ace's is 0.2
    assert all(label["threshold"] == (0.2 if label["name"] == "ace" else 0.5) for label in default["labels"])


def test_push_to_a_local_store_is_served_by_every_replica_without_failures(local_app):
    check_push_served_by_every_replica(local_app)


def test_push_to_an_s3_store_is_served_by_every_replica_without_failures(s3_app):
    check_push_served_by_every_replica(s3_app)


def test_invalid_vocabulary_in_the_store_keeps_the_old_one_serving(local_app):
    store = local_app.store
    serving = store.current_version()
    bad = {"version": "broken", "categories": [{"name": "ace", "threshold": 1.5}, {"name": "king", "aliases": ["ace"]}]}
    storage.write_text(storage.join(store.uri, "versions", "broken.json"), json.dumps(bad))
    storage.write_text(storage.join(store.uri, "CURRENT.json"), json.dumps({"version": "broken"}))
    try:
        replicas = {}

        def every_replica_tried_it() -> bool:  # each watcher polls the store every POLL_S and records the failure
            replicas.update(vocabulary_of_each_replica(local_app.url))
            return all((b.get("last_error") or {}).get("version") == "broken" for b in replicas.values())

        wait_for(every_replica_tried_it, 20)
        for body in replicas.values():
            assert body["version"] == serving
            assert body["last_error"]["version"] == "broken" and body["last_error"]["kind"] == "invalid_version"
            assert "message" not in body["last_error"]  # the reason is in the replica's log, not for clients
        assert post_image(local_app.url, png()).json()["vocabulary_version"] == serving
        assert replica_logs("local").count("threshold 1.5 is outside [0, 1]") >= 2  # each replica logged it once
    finally:
        store.set_current(serving)


# ------------------------------------------------------------------------------------------------- config file
def test_local_serve_config_autoscaling_is_what_serve_reports(ray_cluster, serve_checkpoint, tmp_path):
    from ray import serve

    config = read_serve_config(REPO / "serve_configs" / "local.yaml")
    store = VocabStore(tmp_path / "store")
    store.push(first_vocabulary())
    config.name, config.route_prefix = "from-config", "/from-config"
    config.http_options["port"] = PORT  # the session's proxy (the file says 8000, which may be taken here)
    try:
        deploy({**config.args, "checkpoint": str(serve_checkpoint), "vocab_store": store.uri}, config)
        # Serve's REST API, as `serve status` reads it; the cluster's auth token as `ray get-auth-token` prints it.
        token = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token"], capture_output=True,
                               text=True, check=True).stdout.strip()
        details = requests.get(f"{ray_cluster.dashboard_url}/api/serve/applications/", timeout=10,
                               headers={"Authorization": f"Bearer {token}"} if token else {}).json()
        deployment = details["applications"]["from-config"]["deployments"]["Predictor"]["deployment_config"]
        for key, value in config.deployment["autoscaling_config"].items():
            assert deployment["autoscaling_config"][key] == value, key
        assert deployment["max_ongoing_requests"] == config.deployment["max_ongoing_requests"]
        assert deployment["user_config"] == config.deployment["user_config"]
        status = serve.status().applications["from-config"]
        assert status.status == "RUNNING"
        assert post_image(f"{URL}/from-config", png()).json()["vocabulary_version"] == "1"
    finally:
        serve.delete("from-config")


def test_sarl_serve_stops_cleanly_on_sigterm(ray_cluster, serve_checkpoint, tmp_path):
    """What `docker stop`, systemd and Kubernetes send: the app is deleted and the command exits 0 (Ray's own
    handler aborted the process, the app still deployed)."""
    import os
    import signal

    import ray
    from ray import serve

    store = VocabStore(tmp_path / "store")
    store.push(first_vocabulary())
    command = [str(Path(sys.executable).parent / "sarl"), "serve", "--checkpoint", str(serve_checkpoint),
               "--vocab-store", store.uri, "--address", ray.get_runtime_context().gcs_address, "--port", str(PORT)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        wait_for(lambda: requests.get(f"{URL}/readyz", timeout=5).status_code == 200, 120)
        assert post_image(URL, png()).json()["vocabulary_version"] == "1"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM: deleting the Serve application 'sarl'" in output and "SIGTERM received" not in output
    assert "sarl" not in serve.status().applications
