"""Local-path behaviour of sarl.platform.storage (the S3 side runs against moto in tests/integration)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from sarl.platform import node_cache, storage


def test_uri_helpers() -> None:
    assert storage.is_s3("s3://bucket/key") and not storage.is_s3("/tmp/x") and not storage.is_s3(Path("s3"))
    assert storage.parse_s3("s3://bucket/a/b.txt") == ("bucket", "a/b.txt")
    assert storage.parse_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        storage.parse_s3("/local/path")
    with pytest.raises(ValueError):
        storage.parse_s3("s3:///key")
    assert storage.join("s3://bucket", "runs", "r1/", "/ckpt") == "s3://bucket/runs/r1/ckpt"
    assert storage.join("s3://bucket/prefix/", "x") == "s3://bucket/prefix/x"
    assert storage.join("s3://bucket/prefix") == "s3://bucket/prefix"
    assert storage.join("/data", "runs", "/r1") == os.path.join("/data", "runs", "r1")
    assert storage.join(Path("rel"), "x") == os.path.join("rel", "x")


def test_resolve_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SARL_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    assert storage.resolve_endpoint() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env:1")
    assert storage.resolve_endpoint() == "http://aws-env:1"
    monkeypatch.setenv("SARL_S3_ENDPOINT_URL", "http://sarl-env:2")
    assert storage.resolve_endpoint() == "http://sarl-env:2"
    assert storage.resolve_endpoint("http://explicit:3") == "http://explicit:3"


def test_s3_client_cached_per_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    first = storage.s3_client("http://127.0.0.1:1")
    assert storage.s3_client("http://127.0.0.1:1") is first
    assert storage.s3_client("http://127.0.0.1:2") is not first
    assert first.meta.endpoint_url == "http://127.0.0.1:1"


def test_read_write_exists(tmp_path: Path) -> None:
    uri = storage.join(str(tmp_path), "new", "dir", "file.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "héllo")
    assert storage.exists(uri) and storage.exists(tmp_path / "new")
    assert storage.read_text(uri) == "héllo"
    storage.write_bytes(uri, b"\xff")
    assert storage.read_bytes(uri) == b"\xff"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(tmp_path / "missing")


def test_listing(tmp_path: Path, make_tree: Callable[[Path], None]) -> None:
    make_tree(tmp_path)
    assert storage.list_dir(tmp_path) == ["a.txt", "sub"]
    assert storage.list_dir(tmp_path / "sub") == ["b.bin", "deep"]
    assert storage.list_files(tmp_path) == ["a.txt", "sub/b.bin", "sub/deep/c.json"]
    assert storage.list_dir(tmp_path / "missing") == [] and storage.list_files(tmp_path / "missing") == []


def test_delete(tmp_path: Path, make_tree: Callable[[Path], None]) -> None:
    make_tree(tmp_path)
    storage.delete(tmp_path / "a.txt")
    storage.delete(tmp_path / "sub")
    storage.delete(tmp_path / "missing")  # no error
    assert storage.list_dir(tmp_path) == []


def test_upload_download(tmp_path: Path, make_tree: Callable[[Path], None]) -> None:
    source = tmp_path / "src"
    make_tree(source)
    storage.upload_dir(source, tmp_path / "uploaded")
    assert storage.list_files(tmp_path / "uploaded") == storage.list_files(source)
    back = storage.download_dir(tmp_path / "uploaded", tmp_path / "back")
    assert back == tmp_path / "back" and (back / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    file = storage.download_file(source / "sub" / "deep" / "c.json", tmp_path / "one" / "c.json")
    assert file.read_text() == "{}"
    with pytest.raises(NotADirectoryError):
        storage.upload_dir(source / "a.txt", tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        storage.download_file(source / "missing", tmp_path / "y")


def test_local_copy_returns_local_paths_as_is(tmp_path: Path) -> None:
    assert node_cache.local_copy(str(tmp_path / "ckpt")) == tmp_path / "ckpt"
    assert node_cache.local_copy(tmp_path, cache_dir=tmp_path / "cache") == tmp_path
    assert not (tmp_path / "cache").exists()


def test_check_writable(tmp_path: Path) -> None:
    storage.check_writable(tmp_path / "runs" / "new")  # created, probe removed
    assert storage.list_dir(tmp_path / "runs" / "new") == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(storage.StorageError, match="cannot write"):
        storage.check_writable(blocker / "under-a-file")


def test_pyarrow_filesystem_local() -> None:
    assert storage.pyarrow_filesystem("/tmp/ray_results") == (None, "/tmp/ray_results")
