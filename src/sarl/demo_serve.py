"""The Serve half of ``sarl demo``: serve the trained checkpoint, change the vocabulary live, watch it switch.

1. copies the SARL checkpoint to ``<output_dir>/serve/checkpoint`` and publishes its vocabulary as version 1 in a
   fresh store at ``<output_dir>/serve/vocab_store`` (the paths ``serve_configs/local.yaml`` names);
2. starts Ray Serve on 127.0.0.1 with 2 replicas and sends test images of the generated data set;
3. while a client keeps sending requests, pushes version 2 (an alias, a threshold change, a new zero-shot
   category) and reports when each replica switched, and how many requests failed (none should);
4. shuts Serve down.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .model.checkpoint import MODEL_FILE, VOCAB_FILE, WEIGHTS_FILE
from .model.data import SyntheticShapes
from .model.vocabulary import Category, Vocabulary
from .platform import node_cache
from .platform.runs import JOB_FILE
from .platform.vocab_store import VocabStore

PORT = 8000
POLL_S = 1.0
DEPLOYMENT = {  # two fixed replicas, so the demo shows every replica switching; autoscaling is in local.yaml
    "num_replicas": 2, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 1},
    "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01, "poll_interval_s": POLL_S},
    "logging_config": {"enable_access_log": False},  # keeps the replicas' "serving vocabulary version" lines
}


SERVE_DIR = "serve"  # <output_dir>/serve/checkpoint and vocab_store: what serve_configs/local.yaml names

def _post(url: str, image: bytes, **params: float) -> dict:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    request = urllib.request.Request(f"{url}/v1/predict?{query}", data=image, method="POST",
                                     headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _png(dataset: SyntheticShapes, index: int) -> bytes:
    out = io.BytesIO()
    dataset.load_image(index).save(out, format="PNG")
    return out.getvalue()


def _labels(body: dict) -> str:
    return ", ".join(f"{x['name']}{'*' if x['zero_shot'] else ''} {x['score']:.2f}" for x in body["labels"]) or "-"


class _Traffic(threading.Thread):
    """A client sending one image after another; remembers each response's version and replica."""

    def __init__(self, url: str, image: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.image, self.stop = url, image, threading.Event()
        self.responses: list[tuple[float, str, str]] = []  # (time, version, replica)
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                body = _post(self.url, self.image)
                self.responses.append((time.monotonic(), body["vocabulary_version"], body["replica"]))
            except (urllib.error.URLError, OSError, KeyError) as e:
                self.failures.append(repr(e))


def second_version(trained: Vocabulary) -> Vocabulary:
    """Version 2: an alias, a stricter threshold, and a category the model never saw (zero-shot)."""
    cats = [Category(**c.to_dict()) for c in trained.categories]
    by_name = {c.name: c for c in cats}
    if "circle" in by_name:
        by_name["circle"].aliases = ["round", "disc"]
    if "square" in by_name:
        by_name["square"].threshold = 0.8
    cats.append(Category("heart", prompt="a photo of a {name} shape."))
    return Vocabulary(cats, version="2")


def serving_layout(checkpoint: str, output_dir: str | Path) -> tuple[Path, VocabStore]:
    """``<output_dir>/serve/checkpoint`` (the served files of ``checkpoint``) and a fresh vocabulary store at
    ``<output_dir>/serve/vocab_store`` whose version "1" is the trained vocabulary: what ``serve_configs/local.yaml``
    and ``jobs/{predict,calibrate,complete}.yaml`` name."""
    serve_dir = Path(output_dir) / SERVE_DIR
    shutil.rmtree(serve_dir, ignore_errors=True)
    local = node_cache.local_copy(checkpoint)
    (serve_dir / "checkpoint").mkdir(parents=True)
    # the training state stays with the run; job.yaml comes along for `sarl calibrate` (jobs/calibrate.yaml)
    for name in (MODEL_FILE, VOCAB_FILE, WEIGHTS_FILE, JOB_FILE):
        shutil.copy2(Path(local) / name, serve_dir / "checkpoint" / name)
    store = VocabStore(serve_dir / "vocab_store")
    trained = Vocabulary.load(serve_dir / "checkpoint" / VOCAB_FILE)
    store.push(Vocabulary(trained.categories, version="1"))
    return serve_dir, store


def serve_demo(checkpoint: str, output_dir: str | Path, image_size: int = 64) -> dict:
    """Run steps 1-4 of the module docstring; returns what was measured (for tests and the summary)."""
    from ray import serve

    from .platform.serve import ServeConfig, deploy

    serve_dir, store = serving_layout(checkpoint, output_dir)
    trained = store.load()
    print(f"\n== Ray Serve: 2 replicas on http://127.0.0.1:{PORT}, vocabulary store {store.uri}")
    url = deploy({"checkpoint": str(serve_dir / "checkpoint"), "vocab_store": store.uri},
                 ServeConfig({"host": "127.0.0.1", "port": PORT}, {}, DEPLOYMENT))
    try:
        test = SyntheticShapes(6, image_size=image_size, seed=0, split="test")
        print("predictions (version 1); true labels -> labels at or above each category's threshold:")
        for i in range(3):
            body = _post(url, _png(test, i))
            truth = ", ".join(n for n, y in zip(test.categories, test.labels[i]) if y == 1)
            print(f"  image {i}: {truth:<24} -> {_labels(body)}   (version {body['vocabulary_version']})")

        traffic = _Traffic(url, _png(test, 3))
        traffic.start()
        time.sleep(2.0)
        version2 = second_version(trained)
        store.push(version2)
        pushed = time.monotonic()
        print("pushed version 2 (alias 'round' for circle, threshold 0.8 for square, zero-shot 'heart'); "
              "a client keeps sending...")
        deadline = pushed + POLL_S + 15
        switched: dict[str, float] = {}
        while time.monotonic() < deadline and len(switched) < DEPLOYMENT["num_replicas"]:
            for t, version, replica in list(traffic.responses):
                if version == "2" and replica not in switched:
                    switched[replica] = t - pushed
            time.sleep(0.1)
        time.sleep(1.0)
        traffic.stop.set()
        traffic.join()
        versions = [v for _, v, _ in traffic.responses]
        for replica, seconds in sorted(switched.items()):
            print(f"  replica {replica} served version 2 after {seconds:.2f} s")
        print(f"  {len(versions)} requests during the switch: {versions.count('1')} on version 1, "
              f"{versions.count('2')} on version 2, {len(traffic.failures)} failed; no redeploy")

        body = _post(url, _png(test, 0), threshold=0.0)
        heart = next(x for x in body["labels"] if x["name"] == "heart")
        print(f"image 0 under version {body['vocabulary_version']}: top 3 {_labels({'labels': body['labels'][:3]})}; "
              f"'heart' scored {heart['score']:.2f} with zero_shot={heart['zero_shot']} (from its prompt alone)")
        print(f"try it: curl -s -H 'Content-Type: image/png' --data-binary @image.png {url}/v1/predict")
        return {"switched": switched, "requests": len(versions), "failures": len(traffic.failures),
                "store": store.uri, "checkpoint": str(serve_dir / "checkpoint")}
    finally:
        serve.shutdown()
        print("Serve shut down.")
