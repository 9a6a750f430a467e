"""Paths a job names, as the driver ships them: relative ones made absolute once, s3:// URIs left for the nodes."""

from pathlib import Path

from sarl.platform.cluster import absolute_paths, data_sources, resolve_data_uris
from sarl.platform.job import load_job


def test_relative_paths_become_absolute_on_the_driver_and_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vectors.txt").write_text("cat 0.1 0.2\n")
    job = load_job(None, ["run.storage_path=runs/ray", "data.root=data/voc", "cache.root=feats",
                          "model.word_vectors=vectors.txt", "model.pretrained=openai"])
    shipped = absolute_paths(job)
    assert shipped.run.storage_path == str(tmp_path / "runs" / "ray")
    assert shipped.data.root == str(tmp_path / "data" / "voc") and shipped.cache.root == str(tmp_path / "feats")
    assert shipped.model["word_vectors"] == str(tmp_path / "vectors.txt")
    assert shipped.model["pretrained"] == "openai"  # no such file here: an open_clip tag, not a path
    assert job.run.storage_path == "runs/ray"  # a copy: the caller's job is unchanged

    remote = absolute_paths(load_job(None, ["run.storage_path=s3://b/runs", "data.root=s3://b/voc",
                                            "cache.root=~/.cache/sarl/features"]))
    assert (remote.run.storage_path, remote.data.root) == ("s3://b/runs", "s3://b/voc")
    assert remote.cache.root == "~/.cache/sarl/features"  # each node's own home


def test_resolving_on_a_node_copies_the_job_and_leaves_local_paths(tmp_path):
    job = load_job(None, [f"data.root={tmp_path}", "model.word_vectors=/vectors.txt"])
    resolved = resolve_data_uris(job)
    assert resolved is not job and resolved.data.root == str(tmp_path)
    assert dict(data_sources(job)) == {"data.root": str(tmp_path), "model.word_vectors": "/vectors.txt"}
    assert dict(data_sources(job, model_files=False)) == {"data.root": str(tmp_path)}
    assert Path(resolved.model["word_vectors"]) == Path("/vectors.txt")
