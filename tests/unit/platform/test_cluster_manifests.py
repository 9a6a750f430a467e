"""The shipped cluster files: every KubeRay manifest names only fields of KubeRay's ray.io/v1 CRDs, runs the
project's image with Ray's token auth, a memory-backed /dev/shm and a node cache, and starts a shipped job or
the shipped Serve config; every Serve config names paths that the shipped jobs (and the demo) write."""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path

import pytest
import yaml

from sarl.platform import storage
from sarl.platform.aliases import alias_uri
from sarl.platform.job import load_job

REPO = Path(__file__).resolve().parents[3]
MANIFESTS = sorted((REPO / "jobs" / "kuberay").glob("*.yaml"))
SERVE_CONFIGS = sorted((REPO / "serve_configs").glob("*.yaml"))
COMMAND_FILES = {"predict.yaml", "calibrate.yaml", "complete.yaml"}
JOBS = [p for p in sorted((REPO / "jobs").glob("*.yaml")) if not p.name.startswith("sweep_")
        and p.name not in COMMAND_FILES]

# Fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1, KubeRay 1.5+) at the levels these manifests set:
# a key outside them is a typo the API server rejects (or, with pruning, drops without a word).
CRD_FIELDS = {
    "RayJobSpec": {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
                   "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy",
                   "metadata", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode",
                   "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"},
    "RayServiceSpec": {"deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "rayClusterConfig",
                       "serveConfigV2", "serveService", "serviceUnhealthySecondThreshold", "upgradeStrategy"},
    "RayClusterSpec": {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                       "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
                       "upgradeStrategy", "workerGroupSpecs"},
    "AuthOptions": {"enableK8sTokenAuth", "mode", "secretName"},
    "HeadGroupSpec": {"enableIngress", "headService", "rayStartParams", "serviceType", "template"},
    "WorkerGroupSpec": {"groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts",
                        "rayStartParams", "replicas", "scaleStrategy", "suspend", "template"},
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cluster_spec(manifest: dict) -> dict:
    return {"RayJob": lambda s: s["rayClusterSpec"], "RayService": lambda s: s["rayClusterConfig"]}[
        manifest["kind"]](manifest["spec"])


def pod_specs(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]


def image_of_the_dockerfile() -> str:
    """The tag the Dockerfile's build line gives the image (what the manifests must name)."""
    return re.search(r"docker build -t (\S+) \.", (REPO / "Dockerfile").read_text())[1]


def size_in_bytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i)?", quantity).groups()
    return float(number) * 1024 ** ("_KMGT".index(unit[0]) if unit else 0)


def test_there_is_a_rayjob_and_a_rayservice():
    assert {load(p)["kind"] for p in MANIFESTS} == {"RayJob", "RayService"}
    assert all(load(p)["apiVersion"] == "ray.io/v1" for p in MANIFESTS)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_names_only_kuberay_fields(path):
    manifest = load(path)
    spec, cluster = manifest["spec"], cluster_spec(manifest)
    assert set(spec) <= CRD_FIELDS[f"{manifest['kind']}Spec"], set(spec) - CRD_FIELDS[f"{manifest['kind']}Spec"]
    assert set(cluster) <= CRD_FIELDS["RayClusterSpec"], set(cluster) - CRD_FIELDS["RayClusterSpec"]
    assert set(cluster["authOptions"]) <= CRD_FIELDS["AuthOptions"]
    assert set(cluster["headGroupSpec"]) <= CRD_FIELDS["HeadGroupSpec"]
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= CRD_FIELDS["WorkerGroupSpec"], set(group) - CRD_FIELDS["WorkerGroupSpec"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert all(isinstance(v, str) for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
               for v in g["rayStartParams"].values())  # KubeRay takes rayStartParams as strings only


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_cluster_requires_the_ray_token(path):
    auth = cluster_spec(load(path))["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"] == "sarl-ray-token"
    assert f"kubectl create secret generic {auth['secretName']} --from-literal=auth_token=" in path.read_text()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_pod_runs_the_project_image_with_shared_memory_and_a_node_cache(path):
    image = image_of_the_dockerfile()
    for pod in pod_specs(cluster_spec(load(path))):
        (container,) = pod["containers"]
        assert container["image"] == image
        assert {"secretRef": {"name": "sarl-s3"}} in container["envFrom"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        shm = mounts["/dev/shm"]["emptyDir"]
        assert shm["medium"] == "Memory" and size_in_bytes(shm["sizeLimit"]) >= 1024**3  # over 64 MB: many batches
        cache_dir = next(e["value"] for e in container["env"] if e["name"] == "SARL_CACHE_DIR")
        assert "hostPath" in mounts[cache_dir]  # a node-local disk the node's pods share (flock works on it)


def test_the_image_is_rays_with_the_project_installed_by_the_setup_step():
    import ray

    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"ARG RAY_IMAGE=rayproject/ray:{re.escape(ray.__version__)}-py3\d+", dockerfile)
    assert "RUN sh scripts/install.sh python" in dockerfile
    assert "sh scripts/install.sh $(BIN)/python test" in (REPO / "Makefile").read_text()
    assert all(cluster_spec(load(p))["rayVersion"] == ray.__version__ for p in MANIFESTS)


def test_the_rayjob_runs_a_shipped_job_on_the_workers_it_asks_for():
    (manifest,) = [load(p) for p in MANIFESTS if load(p)["kind"] == "RayJob"]
    command = shlex.split(manifest["spec"]["entrypoint"])
    assert command[:3] == ["sarl", "train", "--config"]
    job = load_job(REPO / command[3])  # relative to the image's working directory, the checkout's root
    workers = cluster_spec(manifest)["workerGroupSpecs"]
    assert job.scaling.num_workers == sum(g["replicas"] for g in workers)
    gpus = {g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in workers}
    assert job.scaling.use_gpu and gpus == {"1"}


def test_the_rayservice_serves_the_shipped_production_config(tmp_path):
    from sarl.platform.serve import read_serve_config

    (manifest,) = [load(p) for p in MANIFESTS if load(p)["kind"] == "RayService"]
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == load(REPO / "serve_configs" / "production.yaml")
    (tmp_path / "serve.yaml").write_text(manifest["spec"]["serveConfigV2"])
    config = read_serve_config(tmp_path / "serve.yaml")  # Serve's own schema, and one sarl application
    assert config.args["device"] == "cuda" and config.deployment["ray_actor_options"]["num_gpus"] == 1


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_every_serve_config_names_paths_the_shipped_jobs_write(path):
    from sarl.demo import run_demo
    from sarl.demo_serve import SERVE_DIR

    (app,) = load(path)["applications"]
    checkpoint, store = app["args"]["checkpoint"], app["args"].get("vocab_store")
    written = {alias_uri(storage.join(job.run.storage_path, job.run_name), "best") for job in map(load_job, JOBS)}
    demo_serve = storage.join(inspect.signature(run_demo).parameters["output_dir"].default, SERVE_DIR)
    written.add(storage.join(demo_serve, "checkpoint"))  # `make demo` copies its model there for Serve
    assert checkpoint in written, (checkpoint, sorted(written))
    if checkpoint.startswith(demo_serve):
        assert store == storage.join(demo_serve, "vocab_store")
    else:  # a store of the same bucket as the run (an operator pushes versions there with `sarl vocab push`)
        assert storage.is_s3(store) and storage.parse_s3(store)[0] == storage.parse_s3(checkpoint)[0]
