"""The node cache behind ``node_cache.local_copy`` with real concurrent processes, keys that try to climb out of a
download directory, gensim ``.kv`` word vectors from S3, and transfer retries; against moto's S3 server.

Child processes come from a ``forkserver`` that has imported ``sarl.platform.storage`` once (importing it means
importing torch: seconds per process on 2 cores). They get the S3 settings as arguments, not from the
environment the forkserver was started with.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest

from sarl.platform import node_cache, storage

pytestmark = pytest.mark.integration

S3_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="module")
def mp():
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["sarl.platform.storage"])
    return ctx


def s3_env() -> dict[str, str]:
    return {name: os.environ[name] for name in S3_VARS}


# ------------------------------------------------------------------------------ child processes (module level)
def _copy_and_read(uri: str, cache: str, env: dict, log: str, barrier, expected: dict, results) -> None:
    """Race the others into ``local_copy``, then keep reading every file for a while; report what was seen."""
    os.environ.update(env)
    real = storage.download_file

    def slow_download(source, target):
        with open(log, "a") as out:
            out.write(f"{os.getpid()} {source}\n")
        time.sleep(0.3)  # a download long enough for the others to miss too
        return real(source, target)

    storage.download_file = slow_download
    barrier.wait()
    problems: list[str] = []
    path = node_cache.local_copy(uri, cache_dir=cache)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # the others are still finishing their local_copy meanwhile
        for rel, content in expected.items():
            try:
                if (path / rel).read_text() != content:
                    problems.append(f"{rel}: wrong content")
            except OSError as error:
                problems.append(f"{rel}: {error}")
        time.sleep(0.01)
    results.put({"path": str(path), "problems": sorted(set(problems))})


def _copy_all(uris: list[str], cache: str, env: dict, max_bytes, results, release=None) -> None:
    """``local_copy`` each URI in order (the cache's use order), report the paths, then hold them until released."""
    os.environ.update(env)
    paths = []
    for uri in uris:
        paths.append(str(node_cache.local_copy(uri, cache_dir=cache, max_bytes=max_bytes)))
        time.sleep(0.02)  # distinct last-use times
    results.put(paths)
    if release is not None:
        release.wait(60)
        results.put([Path(p).read_text() for p in paths])  # still there after the others evicted around it


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- local_copy race
def test_processes_that_miss_together_download_once_and_never_lose_the_copy(s3_bucket: str, tmp_path: Path,
                                                                            mp) -> None:
    expected = {"weights.pt": "w" * 1000, "job.yaml": "name: x\n", "sub/a.txt": "a", "sub/b.txt": "b"}
    uri = f"s3://{s3_bucket}/runs/r1/checkpoint"
    for rel, content in expected.items():
        storage.write_text(storage.join(uri, rel), content)
    cache, log = tmp_path / "cache", tmp_path / "downloads.log"
    barrier, results = mp.Barrier(3), mp.Queue()
    procs = [mp.Process(target=_copy_and_read, args=(uri, str(cache), s3_env(), str(log), barrier, expected, results))
             for _ in range(3)]
    for proc in procs:
        proc.start()
    reports = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert [r["problems"] for r in reports] == [[], [], []]  # nobody saw a missing or partial file
    assert len({r["path"] for r in reports}) == 1  # one published copy
    downloads = log.read_text().splitlines()
    assert len(downloads) == len(expected), downloads  # each object once, by one process
    assert len({line.split()[0] for line in downloads}) == 1
    assert len(entries(cache)) == 1 and not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging left


def test_eviction_removes_least_recently_used_entries_never_one_in_use(s3_bucket: str, tmp_path: Path, mp,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    uris = {}
    for name in "abcd":
        uris[name] = f"s3://{s3_bucket}/data/{name}.bin"
        storage.write_text(uris[name], name * 1000)  # 1000 bytes each
    cache = tmp_path / "cache"
    results, release = mp.Queue(), mp.Event()
    first = mp.Process(target=_copy_all, args=([uris["a"], uris["b"]], str(cache), s3_env(), None, results))
    first.start()
    path_a, path_b = map(Path, results.get(timeout=120))
    first.join(30)  # a and b: no longer in use
    holder = mp.Process(target=_copy_all, args=([uris["c"]], str(cache), s3_env(), None, results, release))
    holder.start()
    (path_c,) = map(Path, results.get(timeout=120))  # c: in use until released

    path_d = node_cache.local_copy(uris["d"], cache_dir=cache, max_bytes=3000)  # 4000 bytes: the oldest goes
    assert not path_a.exists() and path_b.exists() and path_c.exists() and path_d.read_text() == "d" * 1000
    node_cache.local_copy(uris["d"], cache_dir=cache, max_bytes=1500)  # b goes; c stays in use, over the bound
    assert not path_b.exists() and path_c.read_text() == "c" * 1000 and path_d.exists()
    release.set()
    assert results.get(timeout=60) == ["c" * 1000]
    holder.join(30)
    assert holder.exitcode == 0
    monkeypatch.setenv("SARL_CACHE_MAX_BYTES", "1500")  # the bound from the environment
    assert node_cache.local_copy(uris["d"], cache_dir=cache) == path_d
    assert not path_c.exists() and path_d.exists()
    assert entries(cache) == [path_d.parent.name]
    pointer = node_cache._pointer(cache, uris["d"]).name  # d's last published entry; a, b and c's went with them
    assert sorted(p.name for p in cache.iterdir()) == sorted([path_d.parent.name, path_d.parent.name + ".use",
                                                              path_d.parent.name + ".lock", pointer])  # no lock files


def test_a_copy_asked_in_a_holding_block_is_evictable_once_the_block_ends(s3_bucket: str, tmp_path: Path) -> None:
    """Issue 18, 7d: a Ray task's copies (``holding()``, as evaluation tasks do) stop pinning their entries when the
    task ends; its pooled worker process lives on. A copy the process held before the block stays held."""
    uris = {name: f"s3://{s3_bucket}/held/{name}.bin" for name in "abc"}
    for name, uri in uris.items():
        storage.write_text(uri, name * 1000)
    cache = tmp_path / "cache"
    path_c = node_cache.local_copy(uris["c"], cache_dir=cache)  # held by this process until it exits
    with node_cache.holding():
        path_a = node_cache.local_copy(uris["a"], cache_dir=cache)
        assert node_cache.local_copy(uris["c"], cache_dir=cache) == path_c
        path_b = node_cache.local_copy(uris["b"], cache_dir=cache, max_bytes=1500)
        assert path_a.exists() and path_b.exists()  # in use: over the bound, kept
    node_cache.local_copy(uris["c"], cache_dir=cache, max_bytes=1500)  # the task ended: a and b go, c stays
    assert not path_a.exists() and not path_b.exists() and path_c.read_text() == "c" * 1000
    assert entries(cache) == [path_c.parent.name]


def test_a_new_version_gets_a_new_entry_and_the_unused_old_one_goes(s3_bucket: str, tmp_path: Path, mp) -> None:
    uri = f"s3://{s3_bucket}/vectors/words.txt"
    storage.write_text(uri, "v1")
    cache = tmp_path / "cache"
    results = mp.Queue()
    child = mp.Process(target=_copy_all, args=([uri], str(cache), s3_env(), None, results))
    child.start()
    (old,) = map(Path, results.get(timeout=120))
    child.join(30)
    storage.write_text(uri, "v2")
    new = node_cache.local_copy(uri, cache_dir=cache)
    assert new != old and new.read_text() == "v2" and not old.exists()
    storage.write_text(uri, "v3")  # this process still uses the v2 copy: it stays beside v3
    assert node_cache.local_copy(uri, cache_dir=cache).read_text() == "v3" and new.read_text() == "v2"


def test_cache_bound_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SARL_CACHE_MAX_BYTES", raising=False)
    assert node_cache.cache_max_bytes() is None
    for text, value in (("5000", 5000), ("2K", 2048), ("1.5g", int(1.5 * 1024**3)), ("200GiB", 200 * 1024**3)):
        monkeypatch.setenv("SARL_CACHE_MAX_BYTES", text)
        assert node_cache.cache_max_bytes() == value
    monkeypatch.setenv("SARL_CACHE_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="SARL_CACHE_MAX_BYTES"):
        node_cache.cache_max_bytes()


# ------------------------------------------------------------------------------------------------ path traversal
@pytest.mark.parametrize("bad", ["../evil", "a/../../evil", "/abs/evil", "./x"])
def test_keys_that_would_land_outside_are_refused(s3_bucket: str, tmp_path: Path, bad: str) -> None:
    from sarl.model.features import ARRAY_FILES, META_FILE
    from sarl.platform.feature_store import S3FeatureStore

    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="ckpt/weights.pt", Body=b"w")
    client.put_object(Bucket=s3_bucket, Key=f"ckpt/{bad}", Body=b"pwned")  # ckpt/../evil, ckpt//abs/evil ...
    client.put_object(Bucket=s3_bucket, Key=f"features/d1/{bad}", Body=b"pwned")
    for name in (*ARRAY_FILES, META_FILE):
        client.put_object(Bucket=s3_bucket, Key=f"features/d1/{name}", Body=name.encode())
    inside = tmp_path / "a" / "b" / "download"
    with pytest.raises(storage.StorageError, match=f"ckpt/{bad}"):
        storage.download_dir(f"s3://{s3_bucket}/ckpt", inside)
    with pytest.raises(storage.StorageError, match=f"ckpt/{bad}"):
        node_cache.local_copy(f"s3://{s3_bucket}/ckpt", cache_dir=tmp_path / "a" / "cache")
    # a feature entry is fetched by its file names, never by listing: a stray key is not followed at all
    assert S3FeatureStore(f"s3://{s3_bucket}/features").fetch("d1", tmp_path / "entry")
    assert sorted(p.name for p in (tmp_path / "entry").iterdir()) == sorted((*ARRAY_FILES, META_FILE))
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if p.read_bytes() in (b"pwned", b"w")], written  # nothing downloaded at all
    assert not Path("/abs/evil").exists()


# ------------------------------------------------------------------------------------- gensim .kv word vectors
def keyed_vectors():
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=4)
    kv.add_vectors(["person", "dog", "cat"], np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32))
    return kv


def test_kv_word_vectors_from_s3_come_with_their_sidecar_when_trusted(s3_bucket: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from sarl.platform import word_vectors

    kv = keyed_vectors()
    kv.save(str(tmp_path / "vectors.kv"), sep_limit=0)  # the array in vectors.kv.vectors.npy, as GloVe-840B's is
    assert (tmp_path / "vectors.kv.vectors.npy").is_file()
    storage.upload_dir(tmp_path, f"s3://{s3_bucket}/vec")
    storage.write_text(f"s3://{s3_bucket}/vec/vectors.kv.d/other", "not a sidecar")
    uri = f"s3://{s3_bucket}/vec/vectors.kv"
    monkeypatch.setenv("SARL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(word_vectors.TRUST_ENV, raising=False)

    loaded = word_vectors.load(uri, trust_pickle=True)
    np.testing.assert_array_equal(loaded["dog"], kv["dog"])
    assert sorted(p.name for p in node_cache.local_copy(uri).parent.iterdir()) == [
        "manifest.json", "vectors.kv", "vectors.kv.vectors.npy"]
    monkeypatch.setenv(word_vectors.TRUST_ENV, "1")  # the operator's switch
    np.testing.assert_array_equal(word_vectors.load(uri)["cat"], kv["cat"])


def test_pickled_word_vectors_from_s3_are_refused_unless_trusted(s3_bucket: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from sarl.platform import word_vectors
    from sarl.platform.cluster import resolve_data_uris
    from sarl.platform.job import load_job

    kv = keyed_vectors()
    kv.save(str(tmp_path / "vectors.kv"), sep_limit=0)
    kv.save_word2vec_format(str(tmp_path / "vectors.bin"), binary=True)
    for name in ("vectors.kv", "vectors.kv.vectors.npy", "vectors.bin"):
        storage.upload_file(tmp_path / name, f"s3://{s3_bucket}/vec/{name}")
    cache = tmp_path / "cache"
    monkeypatch.setenv("SARL_CACHE_DIR", str(cache))
    monkeypatch.delenv(word_vectors.TRUST_ENV, raising=False)
    uri = f"s3://{s3_bucket}/vec/vectors.kv"

    with pytest.raises(word_vectors.UntrustedPickleError) as info:
        word_vectors.load(uri)
    message = str(info.value)
    assert uri in message and "save_word2vec_format" in message and "binary=True" in message
    assert "SARL_TRUST_PICKLED_VECTORS=1" in message
    monkeypatch.setenv(word_vectors.TRUST_ENV, "0")
    with pytest.raises(word_vectors.UntrustedPickleError):
        word_vectors.load(uri)
    with pytest.raises(word_vectors.UntrustedPickleError):
        word_vectors.load(uri + ".gz")
    job = load_job(None, ["model.semantic_source=word", f"model.word_vectors={uri}"])
    with pytest.raises(word_vectors.UntrustedPickleError):
        resolve_data_uris(job)  # a training job: refused on the driver, before any worker starts
    assert not cache.exists() or not list(cache.rglob("*.kv*"))  # refused before downloading

    binary = word_vectors.load(f"s3://{s3_bucket}/vec/vectors.bin")  # word2vec binary needs no trust
    np.testing.assert_allclose(binary["person"], kv["person"])
    np.testing.assert_array_equal(word_vectors.load(tmp_path / "vectors.kv")["dog"], kv["dog"])  # local: the user's


# ------------------------------------------------------------------------------------------------------- retries
def test_transfers_retry_throttling_and_checks_fail_fast(s3_bucket: str, tmp_path: Path) -> None:
    from botocore.awsrequest import AWSResponse

    storage.write_text(f"s3://{s3_bucket}/d/x.txt", "x")

    class Raw:
        def stream(self, **_):
            yield b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"

    throttled: list[str] = []

    def throttle(request, **_):  # three 503s: all the attempts the old client (and a fail-fast one) makes
        if request.method == "GET" and "/d/x.txt" in request.url and len(throttled) < 3:
            throttled.append(request.url)
            return AWSResponse(request.url, 503, {}, Raw())
        return None

    events = storage.s3_client().meta.events
    events.register_first("before-send.s3", throttle)
    try:
        back = storage.download_dir(f"s3://{s3_bucket}/d", tmp_path / "d")
    finally:
        events.unregister("before-send.s3", throttle)
    assert len(throttled) == 3 and (back / "x.txt").read_text() == "x"
    assert storage.s3_client(fail_fast=True).meta.config.retries["total_max_attempts"] <= 3
    assert storage.s3_client(fail_fast=True) is not storage.s3_client()
    assert storage.s3_client().meta.config.retries["total_max_attempts"] >= 6


# ------------------------------------------------------------------------------ revalidation, and an outage
@pytest.fixture
def s3_operations() -> Iterator[list[str]]:
    """The names of the S3 operations this process's clients send during the test (boto3's own event hook)."""
    sent: list[str] = []

    def record(model, **kwargs) -> None:
        sent.append(model.name)

    clients = [storage.s3_client(fail_fast=fail_fast) for fail_fast in (False, True)]
    for client in clients:
        client.meta.events.register("before-call.s3", record)
    yield sent
    for client in clients:
        client.meta.events.unregister("before-call.s3", record)


def test_a_copy_is_revalidated_with_one_head_and_used_while_the_store_is_down(s3_bucket: str, tmp_path: Path,
                                                                             s3_outage, s3_operations, caplog) -> None:
    """A checkpoint directory (its digest.txt names the version) and a single file: the second local_copy asks S3
    one HEAD, no listing; with the endpoint stopped, the copy on disk is used and the log says so; a new version
    is fetched once the store is back; a URI never copied here still fails while the store is down."""
    root = f"s3://{s3_bucket}"
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    for name, text in {"model.json": "{}", "weights.pt": "w1", "digest.txt": "sha256:one"}.items():
        (checkpoint / name).write_text(text)
    storage.upload_dir(checkpoint, f"{root}/runs/ckpt")
    storage.write_text(f"{root}/vectors.txt", "cat 1 2\n")
    cache = tmp_path / "cache"
    first = node_cache.local_copy(f"{root}/runs/ckpt", cache_dir=cache)
    vectors = node_cache.local_copy(f"{root}/vectors.txt", cache_dir=cache)
    s3_operations.clear()
    assert node_cache.local_copy(f"{root}/runs/ckpt", cache_dir=cache) == first
    assert node_cache.local_copy(f"{root}/vectors.txt", cache_dir=cache) == vectors
    assert s3_operations == ["HeadObject", "HeadObject"]  # no ListObjectsV2: the prefix is not listed again

    s3_outage.stop()
    try:
        with caplog.at_level("WARNING", logger="sarl.node_cache"):
            assert node_cache.local_copy(f"{root}/runs/ckpt", cache_dir=cache) == first
            assert (first / "weights.pt").read_text() == "w1"
        assert "the store cannot be reached" in caplog.text and str(first.parent) in caplog.text
        with pytest.raises(Exception) as info:  # nothing on disk to fall back on
            node_cache.local_copy(f"{root}/runs/other", cache_dir=cache)
        assert storage.is_unreachable(info.value) or isinstance(info.value, storage.StorageError), info.value
    finally:
        s3_outage.start()

    storage.write_text(f"{root}/runs/ckpt/weights.pt", "w2")  # a new version: its digest changes with it
    storage.write_text(f"{root}/runs/ckpt/digest.txt", "sha256:two")
    second = node_cache.local_copy(f"{root}/runs/ckpt", cache_dir=cache)
    assert second != first and (second / "weights.pt").read_text() == "w2"


def test_a_data_set_with_an_index_is_revalidated_with_one_head_and_one_without_is_listed(
        s3_bucket: str, tmp_path: Path, s3_operations, capsys) -> None:
    """Issue 18, 4: a data set folder (no digest.txt) was listed again at every use (each Train worker start). With
    ``sarl index`` written, a use asks one HEAD of the index, which is not part of the copy; a changed folder is
    fetched again once its index is rewritten. Without an index, a use lists the prefix, as before."""
    from sarl.cli import main

    root = f"s3://{s3_bucket}"
    folder = tmp_path / "shapes"
    (folder / "images").mkdir(parents=True)
    for i in range(3):
        (folder / "images" / f"{i}.png").write_bytes(b"png%d" % i)
    (folder / "labels.csv").write_text("path,cat\nimages/0.png,1\n")
    for name in ("indexed", "plain"):
        storage.upload_dir(folder, f"{root}/data/{name}")
    assert main(["index", f"{root}/data/indexed/"]) == 0
    assert "4 objects" in capsys.readouterr().out
    index = json.loads(storage.read_text(f"{root}/data/indexed/{node_cache.INDEX_NAME}"))
    assert index["objects"] == 4 and index["bytes"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    cache = tmp_path / "cache"
    first = node_cache.local_copy(f"{root}/data/indexed", cache_dir=cache)
    plain = node_cache.local_copy(f"{root}/data/plain", cache_dir=cache)
    assert sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file()) == [
        "images/0.png", "images/1.png", "images/2.png", "labels.csv"]  # the index is not part of the copy

    s3_operations.clear()
    assert node_cache.local_copy(f"{root}/data/indexed", cache_dir=cache) == first
    assert s3_operations == ["HeadObject"]  # the index's; no ListObjectsV2
    s3_operations.clear()
    assert node_cache.local_copy(f"{root}/data/plain", cache_dir=cache) == plain
    assert "ListObjectsV2" in s3_operations  # no index: the prefix is listed

    storage.write_text(f"{root}/data/indexed/labels.csv", "path,cat\nimages/1.png,1\n")
    node_cache.write_index(f"{root}/data/indexed")
    second = node_cache.local_copy(f"{root}/data/indexed", cache_dir=cache)
    assert second != first and (second / "labels.csv").read_text().startswith("path,cat\nimages/1.png")
    assert json.loads(storage.read_text(f"{root}/data/indexed/{node_cache.INDEX_NAME}"))["version"] != index["version"]
    with pytest.raises(FileNotFoundError):
        node_cache.write_index(f"{root}/data/nothing-here")


# ------------------------------------------------------------------------------------------ S3 feature cache
def test_two_machines_missing_one_feature_entry_compute_it_once(s3_bucket: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18, 10: trials of one sweep on two machines (two local mirrors, one S3 root) miss the same entry at
    once: one computes it under the lease, the other waits and downloads it; a lease whose holder died (not
    rewritten for LEASE_TTL_S) is taken over."""
    import contextlib
    import threading

    from tests.unit.model.test_features import key_for, shapes, tiny

    from sarl.model.features import FeatureCache, key_digest
    from sarl.platform import feature_store

    monkeypatch.setattr(feature_store, "POLL_S", 0.1)
    model, ds = tiny(), shapes(n=16)
    key = key_for(model, ds)
    root = f"s3://{s3_bucket}/features"
    results: dict[str, tuple] = {}

    both_missed = threading.Barrier(2, timeout=60)
    computing = feature_store.S3FeatureStore.computing

    @contextlib.contextmanager
    def after_both_missed(store: feature_store.S3FeatureStore, digest: str) -> Iterator[None]:
        both_missed.wait()  # neither machine goes on before both have missed the entry: a true race
        with computing(store, digest):
            yield

    def machine(name: str) -> None:
        cache = FeatureCache(tmp_path / name, remote=feature_store.S3FeatureStore(root))
        results[name] = cache.get_or_compute(model, ds, key, batch_size=4)

    monkeypatch.setattr(feature_store.S3FeatureStore, "computing", after_both_missed)
    threads = [threading.Thread(target=machine, args=(name,)) for name in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    monkeypatch.setattr(feature_store.S3FeatureStore, "computing", computing)
    assert not both_missed.broken
    assert sorted(hit for _, hit in results.values()) == [False, True], results  # one computed, one downloaded
    one, two = (np.asarray(results[name][0].dense) for name in ("one", "two"))
    assert np.array_equal(one, two)
    digest = results["one"][0].path.name
    assert not storage.exists(f"{root}/{digest}/{feature_store.LEASE_FILE}")  # released

    other = key_for(model, ds, split="train")  # a machine that died holding the lease of another entry
    dead = f"{root}/{key_digest(other)}"
    assert storage.create_exclusive(f"{dead}/{feature_store.LEASE_FILE}", b"{}")
    assert not storage.create_exclusive(f"{dead}/{feature_store.LEASE_FILE}", b"{}")
    monkeypatch.setattr(feature_store, "LEASE_TTL_S", 1.0)
    features, hit = FeatureCache(tmp_path / "three", remote=feature_store.S3FeatureStore(root)).get_or_compute(
        model, ds, other, batch_size=4)
    assert not hit and len(features) == 16 and storage.exists(f"{dead}/meta.json")
