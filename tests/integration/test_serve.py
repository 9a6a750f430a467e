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
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from sarl.model.checkpoint import checkpoint_digest
from sarl.platform import storage
from sarl.platform.serve import deploy, read_serve_config, resolve_args
from sarl.platform.vocab_store import VocabStore

from serving import (
    CARDS,
    MAX_BODY,
    MAX_PIXELS,
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
        expected = expected_scores(local_app.checkpoint, data)  # decoded at reduced scale (JPEG), as served
        best = sorted(range(len(CARDS)), key=lambda i: -float(expected[i]))[:2]
        assert list(raw["scores"]) == [CARDS[i] for i in best]
        for name, score in raw["scores"].items():
            assert score == pytest.approx(float(expected[CARDS.index(name)]), abs=1e-5)
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
        assert f"over the limit of {MAX_PIXELS} pixels" in body["error"]
    for _ in range(4):  # both replicas (the router spreads requests) still answer normally
        assert post_image(local_app.url, image).status_code == 200


def test_oversized_uploads_under_load_each_get_their_413(local_app):
    """50 uploads over ``max_body_bytes`` at once, by urllib (the client that once saw its connection reset instead),
    while a client keeps predicting: each gets its 413 JSON, half refused from Content-Length before the body is
    read, half (chunked) while it streams; no connection is reset and every prediction succeeds.

    urllib sends ``Connection: close`` and writes the whole body before it reads, so the proxy closed the connection
    right after an early 413 with the rest unread: reset, for 42 of 50 such uploads before the replica read the
    rest first. 11 MB: what is left past the 1 MB limit must be more than loopback's socket buffers hold (at
    1.5 MB every upload got its 413 even then)."""
    body = b"\0" * (11 * MAX_BODY)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def upload(i: int) -> tuple[object, dict | None, float]:
        chunked = i % 2 == 1  # an iterable body: urllib sends it chunked, without Content-Length
        data = iter([body[j:j + 65536] for j in range(0, len(body), 65536)]) if chunked else body
        request = urllib.request.Request(f"{local_app.url}/v1/predict", data=data, method="POST",
                                         headers={"Content-Type": "image/jpeg"})
        started = time.monotonic()
        try:
            with opener.open(request, timeout=30) as response:
                return response.status, None, time.monotonic() - started
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), time.monotonic() - started
        except OSError as e:  # a reset, a refused connection, a timeout
            return repr(e), None, time.monotonic() - started

    with Client(local_app.url, threads=3) as load:
        wait_for(lambda: len(load.records) >= 6, 15)
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(upload, range(50)))
        during = len(load.records)
        wait_for(lambda: len(load.records) >= during + 6, 15)
    statuses = [status for status, _, _ in results]
    latencies = sorted(seconds for _, _, seconds in results)
    print(f"\n50 oversized uploads under load: {statuses.count(413)} x 413, "
          f"{sum(not isinstance(s, int) for s in statuses)} without a response; latency p50 "
          f"{1000 * latencies[25]:.0f} ms, max {1000 * latencies[-1]:.0f} ms; {len(load.records)} predictions "
          f"meanwhile, {sum(r.status != 200 for r in load.records)} failed")
    assert statuses == [413] * 50, [s for s in statuses if s != 413]
    for _, answer, _ in results:
        assert answer["status"] == 413 and answer["reason"] == "too_large" and answer["request_id"]
    assert [r.status for r in load.records if r.status != 200] == []


def test_the_app_builder_checks_s3_checkpoints_and_stores(serve_checkpoint, s3_bucket):
    """A HEAD (a one-key listing for what is missing) per file, before anything is deployed."""
    checkpoint, store = f"s3://{s3_bucket}/runs/a/checkpoint", f"s3://{s3_bucket}/vocab"
    with pytest.raises(FileNotFoundError, match=f"^checkpoint {checkpoint} does not exist$"):
        resolve_args({"checkpoint": checkpoint})
    with pytest.raises(FileNotFoundError, match="^checkpoint s3://sarl-no-such-bucket/c does not exist$"):
        resolve_args({"checkpoint": "s3://sarl-no-such-bucket/c"})
    storage.upload_dir(serve_checkpoint, checkpoint)
    with pytest.raises(FileNotFoundError, match=f"^vocabulary store {store} does not exist"):
        resolve_args({"checkpoint": checkpoint, "vocab_store": store})
    VocabStore(store).push(first_vocabulary())
    assert resolve_args({"checkpoint": checkpoint, "vocab_store": store}).checkpoint == checkpoint


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
        for key in ("max_ongoing_requests", "max_queued_requests"):
            assert deployment[key] == config.deployment[key], key
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
