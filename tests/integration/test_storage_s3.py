"""sarl.platform.storage against moto's S3 server over real HTTP (boto3 and pyarrow, no patched clients)."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
import pytest

from sarl.platform import node_cache, storage

pytestmark = pytest.mark.integration


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_read_write_exists(s3_bucket: str) -> None:
    root = f"s3://{s3_bucket}"
    uri = storage.join(root, "dir", "file.txt")
    assert storage.exists(root) and not storage.exists(uri)
    storage.write_text(uri, "héllo")
    assert storage.read_text(uri) == "héllo"
    assert storage.exists(uri) and storage.exists(storage.join(root, "dir")) and storage.exists(root + "/dir/")
    assert not storage.exists(storage.join(root, "di"))  # a prefix of a name is not a directory
    storage.write_bytes(uri, b"\xff")
    assert storage.read_bytes(uri) == b"\xff"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))
    assert not storage.exists("s3://sarl-no-such-bucket/x") and not storage.exists("s3://sarl-no-such-bucket")


def test_listing_and_delete(s3_bucket: str, tmp_path: Path, make_tree: Callable[[Path], None]) -> None:
    make_tree(tmp_path)
    root = f"s3://{s3_bucket}/tree"
    storage.upload_dir(tmp_path, root)
    assert storage.list_dir(root) == ["a.txt", "sub"]
    assert storage.list_dir(root + "/") == ["a.txt", "sub"]
    assert storage.list_dir(storage.join(root, "sub")) == ["b.bin", "deep"]
    assert storage.list_dir(f"s3://{s3_bucket}") == ["tree"]
    assert storage.list_files(root) == ["a.txt", "sub/b.bin", "sub/deep/c.json"]
    assert storage.list_dir(storage.join(root, "missing")) == [] and storage.list_files(root + "/missing") == []

    storage.delete(storage.join(root, "a.txt"))
    storage.delete(storage.join(root, "sub"))
    storage.delete(storage.join(root, "missing"))  # no error
    assert storage.list_files(root) == [] and not storage.exists(root)
    with pytest.raises(ValueError):
        storage.delete(f"s3://{s3_bucket}")


@pytest.mark.slow
def test_listing_paginates(s3_bucket: str) -> None:
    client = boto3.client("s3")
    keys = [f"many/{i:04d}" for i in range(1005)] + [f"many/sub{i}/x" for i in range(3)]  # > 1 page (1000 keys)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=s3_bucket, Key=key, Body=b""), keys))
    root = f"s3://{s3_bucket}/many"
    assert len(storage.list_dir(root)) == 1008
    assert len(storage.list_files(root)) == 1008
    storage.delete(root)  # more than one DeleteObjects batch
    assert storage.list_files(root) == []


def test_directory_markers_are_not_files(s3_bucket: str) -> None:
    """Tools such as pyarrow write empty ``dir/`` objects; they are directories, not files."""
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="d/", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="d/e/", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="d/f.txt", Body=b"f")
    assert storage.list_dir(f"s3://{s3_bucket}/d") == ["e", "f.txt"]
    assert storage.list_files(f"s3://{s3_bucket}/d") == ["f.txt"]
    storage.delete(f"s3://{s3_bucket}/d")
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


def test_upload_download_dir(s3_bucket: str, tmp_path: Path, make_tree: Callable[[Path], None]) -> None:
    make_tree(tmp_path / "src")
    uri = f"s3://{s3_bucket}/runs/r1"
    storage.upload_dir(tmp_path / "src", uri)
    back = storage.download_dir(uri, tmp_path / "back")
    assert storage.list_files(back) == ["a.txt", "sub/b.bin", "sub/deep/c.json"]
    assert (back / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    one = storage.download_file(storage.join(uri, "sub/deep/c.json"), tmp_path / "one" / "c.json")
    assert one.read_text() == "{}" and storage.list_dir(tmp_path / "one") == ["c.json"]  # no partial left
    with pytest.raises(FileNotFoundError):
        storage.download_file(storage.join(uri, "missing"), tmp_path / "missing")


def test_local_copy_of_a_file(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/vectors/words.txt"
    storage.write_text(uri, "v1")
    path = node_cache.local_copy(uri, cache_dir=tmp_path / "cache")
    assert path.name == "words.txt" and path.read_text() == "v1"
    assert node_cache.local_copy(uri, cache_dir=tmp_path / "cache") == path  # reused
    storage.write_text(uri, "v2")  # re-uploaded: fetched again
    assert node_cache.local_copy(uri, cache_dir=tmp_path / "cache").read_text() == "v2"
    with pytest.raises(FileNotFoundError):
        node_cache.local_copy(f"s3://{s3_bucket}/vectors/missing.txt", cache_dir=tmp_path / "cache")


def test_local_copy_of_a_prefix(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                make_tree: Callable[[Path], None]) -> None:
    make_tree(tmp_path / "src")
    uri = f"s3://{s3_bucket}/checkpoints/best"
    storage.upload_dir(tmp_path / "src", uri)
    monkeypatch.setenv("SARL_CACHE_DIR", str(tmp_path / "default-cache"))
    path = node_cache.local_copy(uri + "/")
    assert path.is_dir() and path.name == "best" and tmp_path / "default-cache" in path.parents
    assert storage.list_files(path) == ["a.txt", "sub/b.bin", "sub/deep/c.json"]
    assert node_cache.local_copy(uri) == path
    storage.write_text(storage.join(uri, "new.txt"), "n")
    assert "new.txt" in storage.list_dir(node_cache.local_copy(uri))


def test_check_writable(s3_bucket: str) -> None:
    storage.check_writable(f"s3://{s3_bucket}/runs")
    assert storage.list_files(f"s3://{s3_bucket}") == []  # probe removed


def test_check_writable_missing_bucket(s3_server: str) -> None:
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.check_writable("s3://sarl-no-such-bucket/runs")
    assert time.monotonic() - start < 15


def test_check_writable_unreachable_endpoint(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match="cannot reach"):
        storage.check_writable("s3://bucket/runs", endpoint_url=endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # the way users configure it
    with pytest.raises(storage.StorageError, match=endpoint):
        storage.check_writable("s3://bucket/runs")
    assert time.monotonic() - start < 15


def test_check_writable_without_credentials(s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("SARL_S3_ENDPOINT_URL", storage.resolve_endpoint() + "/")  # a fresh client, same server
    with pytest.raises(storage.StorageError, match="credentials"):
        storage.check_writable(f"s3://{s3_bucket}/runs")


def test_pyarrow_filesystem(s3_bucket: str) -> None:
    filesystem, path = storage.pyarrow_filesystem(f"s3://{s3_bucket}/ray/results/")
    assert path == f"{s3_bucket}/ray/results"
    with filesystem.open_output_stream(f"{path}/x.txt") as out:
        out.write(b"from pyarrow")
    assert storage.read_bytes(f"s3://{s3_bucket}/ray/results/x.txt") == b"from pyarrow"
    storage.write_bytes(f"s3://{s3_bucket}/ray/results/y.txt", b"from boto3")
    with filesystem.open_input_stream(f"{path}/y.txt") as stream:
        assert stream.read() == b"from boto3"


def test_pyarrow_filesystem_holds_no_credentials_and_takes_the_buckets_region(s3_server: str) -> None:
    """Ray pickles the filesystem (Tune's tuner.pkl in the results, every worker's copy): no key may be in it, and
    Arrow does not follow region redirects, so a bucket outside the environment's region must be found there."""
    import os
    import pickle

    bucket = f"sarl-eu-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    filesystem, path = storage.pyarrow_filesystem(f"s3://{bucket}/runs")
    assert filesystem.region == "eu-west-1"  # not AWS_DEFAULT_REGION (us-east-1)
    pickled = pickle.dumps(filesystem)
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in pickled
    assert os.environ["AWS_ACCESS_KEY_ID"].encode() not in pickled
    with pickle.loads(pickled).open_output_stream(f"{path}/x.txt") as out:  # credentials from the environment
        out.write(b"default chain")
    assert storage.read_bytes(f"s3://{bucket}/runs/x.txt") == b"default chain"


def test_a_pickled_pyarrow_filesystem_rides_out_an_endpoint_outage(s3_bucket: str, s3_outage) -> None:
    """Ray's controller and workers write through pickled copies of the filesystem. Arrow's pickling drops the
    retry strategy (its default, 3 attempts, gives up after about 2.5 s); the copy must keep all of its attempts
    and write through an outage of 6 s."""
    import pickle

    filesystem, path = storage.pyarrow_filesystem(f"s3://{s3_bucket}/runs")
    copy = pickle.loads(pickle.dumps(filesystem))
    s3_outage.for_seconds(6.0)
    time.sleep(0.5)  # the endpoint is down when the write starts
    started = time.monotonic()
    with copy.open_output_stream(f"{path}/checkpoint_manager_snapshot.json") as out:
        out.write(b"{}")
    assert time.monotonic() - started >= 5.0  # it waited the outage out
    assert storage.read_bytes(f"s3://{s3_bucket}/runs/checkpoint_manager_snapshot.json") == b"{}"


@pytest.mark.integration
def test_job_reads_a_data_set_and_word_vectors_from_s3(s3_bucket, tmp_path):
    """data.root and model.word_vectors as s3:// URIs: copied to a local cache, then used as local files."""
    from gensim.models import KeyedVectors

    from sarl.model.data import SyntheticShapes
    from sarl.model.experiment import prepare_data
    from sarl.platform.cluster import resolve_data_uris
    from sarl.platform.job import load_job

    source = SyntheticShapes(12, image_size=32, num_classes=3, seed=1)
    source.write_to(tmp_path / "shapes")
    storage.upload_dir(tmp_path / "shapes", f"s3://{s3_bucket}/data/shapes")
    kv = KeyedVectors(vector_size=4)
    kv.add_vectors(source.categories, np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32))
    kv.save_word2vec_format(str(tmp_path / "vectors.txt"))
    storage.write_bytes(f"s3://{s3_bucket}/vectors.txt", (tmp_path / "vectors.txt").read_bytes())

    job = load_job(None, ["data.kind=manifest", f"data.root=s3://{s3_bucket}/data/shapes", "data.test_split=train",
                          "model.semantic_source=word",
                          f"model.word_vectors=s3://{s3_bucket}/vectors.txt", f"data.categories={source.categories}"])
    job = resolve_data_uris(job)
    assert not storage.is_s3(job.data.root) and not storage.is_s3(job.model["word_vectors"])
    splits = prepare_data(job)
    assert len(splits.train) + len(splits.val) == 12
    np.testing.assert_array_equal(splits.test.labels, source.labels)
    from sarl.model import create_model

    model = create_model(job.model_config(), splits.categories)
    assert model.semantics.shape == (3, 4)


def test_complete_matches_the_rows_of_an_s3_manifest_to_the_predictions_made_from_it(s3_bucket: str,
                                                                                      tmp_path: Path) -> None:
    """``sarl complete --manifest s3://...``: sarl predict names each image by its URI beside the manifest; the
    completion looks rows up by the same URI (not the node-cache path of its copy), and refuses, loudly, when no
    prediction matches any row."""
    import json

    from sarl.model.data.manifest import ManifestRow, write_manifest
    from sarl.platform.complete import CompleteError, run_complete
    from sarl.platform.predict import _manifest_paths

    local = write_manifest(tmp_path / "train.jsonl", [ManifestRow("img/a.png", ["cat"], ["dog"]),
                                                      ManifestRow("img/b.png", [], ["cat", "dog"])])
    manifest = f"s3://{s3_bucket}/data/train.jsonl"
    storage.upload_file(local, manifest)
    paths = _manifest_paths(manifest)  # the keys of sarl predict's rows
    assert paths == [f"s3://{s3_bucket}/data/img/a.png", f"s3://{s3_bucket}/data/img/b.png"]
    predictions = [{"path": paths[0], "scores": {"cat": 0.9, "dog": 0.99}},
                   {"path": paths[1], "scores": {"cat": 0.01, "dog": 0.97}}]
    output = f"s3://{s3_bucket}/data/completed.jsonl"
    counts = run_complete(manifest, predictions, {"cat": 0.5, "dog": 0.5}, output)
    assert counts["unscored"] == 0 and counts["predicted_present"] == 2 and counts["predicted_absent"] == 1
    done = [json.loads(line) for line in storage.read_text(output).splitlines()]
    assert done[0]["labels"] == ["cat", "dog"] and done[1]["labels"] == ["dog"] and done[1]["unknown"] == []
    elsewhere = [{**p, "path": str(tmp_path / Path(p["path"]).name)} for p in predictions]
    with pytest.raises(CompleteError, match="no prediction matches a row"):
        run_complete(manifest, elsewhere, {"cat": 0.5, "dog": 0.5}, output)
