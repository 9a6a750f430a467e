"""The shipped cluster files: every KubeRay manifest names only fields of KubeRay's ray.io/v1 CRDs, runs the
project's image with Ray's token auth, a memory-backed /dev/shm that the object store leaves room in and a node
cache its user can write, and starts a shipped job or the shipped Serve config; the image and `make setup` install
the same wheels; every Serve config names the paths and word vectors that the shipped jobs (and the demo) write
and train with."""

from __future__ import annotations

import inspect
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sarl.model.factory import get_model_config
from sarl.model.vocabulary import is_builtin_word_vectors
from sarl.platform import node_cache, storage
from sarl.platform.aliases import alias_uri
from sarl.platform.job import load_job

REPO = Path(__file__).resolve().parents[3]
MANIFESTS = sorted((REPO / "jobs" / "kuberay").glob("*.yaml"))
SERVE_CONFIGS = sorted((REPO / "serve_configs").glob("*.yaml"))
COMMAND_FILES = {"predict.yaml", "calibrate.yaml", "complete.yaml"}
JOBS = [p for p in sorted((REPO / "jobs").glob("*.yaml")) if not p.name.startswith("sweep_")
        and p.name not in COMMAND_FILES]

# Fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1, KubeRay 1.6+: secretName, enableK8sTokenAuth and
# upgradeStrategy are not in 1.5) at the levels these manifests set:
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


def groups(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def cache_volume(pod: dict) -> dict:
    """The node cache's volume of a pod: the one its Ray container mounts at ``$SARL_CACHE_DIR``."""
    (container,) = pod["containers"]
    cache_dir = next(e["value"] for e in container["env"] if e["name"] == "SARL_CACHE_DIR")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == cache_dir]
    return next(v for v in pod["volumes"] if v["name"] == mount["name"])


def shm_volume(pod: dict) -> dict:
    """The ``emptyDir`` a pod's Ray container mounts at /dev/shm."""
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (shm,) = [volumes[m["name"]]["emptyDir"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    return shm


def shm_bytes(pod: dict) -> float:
    return size_in_bytes(shm_volume(pod)["sizeLimit"])


# PyTorch's DataLoader prefetches 2 batches per worker when prefetch_factor is not given (src/sarl sets none).
PREFETCH_FACTOR = 2


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
        assert shm_volume(pod)["medium"] == "Memory" and shm_bytes(pod) >= 1024**3  # over 64 MB: many batches
        assert "hostPath" in cache_volume(pod)  # a node-local disk the node's pods share (flock works on it)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_node_cache_is_writable_by_the_container_user_and_bounded(path, monkeypatch):
    for pod in pod_specs(cluster_spec(load(path))):
        (container,) = pod["containers"]
        volume = cache_volume(pod)
        # the kubelet creates a hostPath DirectoryOrCreate as root's (0755): an init container, as root, hands the
        # directory to the user the Ray container runs as before it starts
        user = container["securityContext"]["runAsUser"], container["securityContext"]["runAsGroup"]
        assert user[0] != 0
        (init,) = [c for c in pod.get("initContainers", [])
                   if any(m["name"] == volume["name"] for m in c["volumeMounts"])]
        (init_mount,) = [m for m in init["volumeMounts"] if m["name"] == volume["name"]]
        assert init["securityContext"]["runAsUser"] == 0 and not init_mount.get("readOnly")
        assert init["command"] == ["chown", f"{user[0]}:{user[1]}", init_mount["mountPath"]]
        env = {e["name"]: e["value"] for e in container["env"]}
        monkeypatch.setenv("SARL_CACHE_MAX_BYTES", env["SARL_CACHE_MAX_BYTES"])
        assert node_cache.cache_max_bytes() >= 10 * 1024**3  # a job's data, vectors and checkpoints several times


def test_pods_that_share_a_node_cache_directory_evict_to_one_bound():
    bounds = {}
    for path in MANIFESTS:
        for pod in pod_specs(cluster_spec(load(path))):
            (container,) = pod["containers"]
            env = {e["name"]: e["value"] for e in container["env"]}
            bounds.setdefault(cache_volume(pod)["hostPath"]["path"], set()).add(env["SARL_CACHE_MAX_BYTES"])
    assert all(len(b) == 1 for b in bounds.values()), bounds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_object_store_leaves_room_in_shared_memory(path):
    """Ray puts its object store in /dev/shm, by default up to 95% of it: every group bounds it below the tmpfs."""
    for group in groups(cluster_spec(load(path))):
        store = int(group["rayStartParams"]["object-store-memory"])
        assert 75 * 1024**2 <= store < shm_bytes(group["template"]["spec"])  # Ray's least object store: 75 MB


def test_the_rayjob_workers_shared_memory_holds_the_object_store_and_the_loaders_batches():
    (manifest,) = [load(p) for p in MANIFESTS if load(p)["kind"] == "RayJob"]
    job = load_job(REPO / shlex.split(manifest["spec"]["entrypoint"])[3])
    model = dict(job.model)
    size = get_model_config(model.pop("name"), **model).image_size
    batch = max(job.train.batch_size, job.train.eval_batch_size) * 3 * size**2 * 4  # float32
    for group in cluster_spec(manifest)["workerGroupSpecs"]:
        room = shm_bytes(group["template"]["spec"]) - int(group["rayStartParams"]["object-store-memory"])
        assert room >= job.data.num_workers * PREFETCH_FACTOR * batch, (room, job.data.num_workers, batch)


def test_the_image_is_rays_with_the_project_installed_by_the_setup_step():
    import ray

    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"ARG RAY_IMAGE=rayproject/ray:{re.escape(ray.__version__)}-py3\d+", dockerfile)
    assert "RUN sh scripts/install.sh python" in dockerfile
    assert "sh scripts/install.sh $(BIN)/python test" in (REPO / "Makefile").read_text()
    assert all(cluster_spec(load(p))["rayVersion"] == ray.__version__ for p in MANIFESTS)


def pip_installs(command: str, tmp: Path, env: dict[str, str]) -> list[str]:
    """The `python -m pip install` argument lists ``command`` runs (in the checkout) when ``python`` and
    ``tmp/venv/bin/python`` are a stand-in that only records its arguments."""
    log = tmp / f"pip-{len(list(tmp.glob('pip-*')))}.log"
    for python in (tmp / "bin" / "python", tmp / "venv" / "bin" / "python"):
        python.parent.mkdir(parents=True, exist_ok=True)
        python.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{log}'\n")
        python.chmod(0o755)
    env = {**env, "PATH": f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(command, shell=True, cwd=REPO, env=env, check=True, capture_output=True)
    return [line.removeprefix("-m pip install ") for line in log.read_text().splitlines()]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_image_and_make_setup_install_the_same_wheels(tmp_path):
    """The Dockerfile's install step, run with its ARG and ENV values, and `make setup` (into a stand-in venv):
    every pip install but the project's own (the image has no test extras) is the same."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_PINS", "MAKEFLAGS", "MAKELEVEL")}
    docker_env, docker_runs = dict(env), []
    lines = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text()).splitlines()
    for line in lines[next(i for i, x in enumerate(lines) if x.startswith("FROM ")):]:
        instruction, _, rest = line.partition(" ")
        if instruction in ("ARG", "ENV") and "=" in rest:
            docker_env.update(word.split("=", 1) for word in shlex.split(rest))  # a value of an ARG or ENV
        elif instruction == "RUN" and "scripts/install.sh" in rest:
            docker_runs.append(rest)
    (docker_run,) = docker_runs
    image = pip_installs(docker_run, tmp_path, docker_env)
    # PYTHON: were the stand-in venv missing, make would create it with the stand-in, not a real one
    setup = pip_installs(f"make -s setup VENV={tmp_path / 'venv'} PYTHON={tmp_path / 'bin' / 'python'}", tmp_path,
                         env)
    assert image[-1].startswith("--quiet -e .") and setup[-1].startswith("--quiet -e .")
    assert image[:-1] == setup[:-1] and any("torch==" in line for line in image[:-1]), (image, setup)


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
    from sarl.demo import DEMO_JOB, run_demo
    from sarl.demo_serve import SERVE_DIR

    (app,) = load(path)["applications"]
    checkpoint, store = app["args"]["checkpoint"], app["args"].get("vocab_store")
    # the checkpoint each shipped job writes (its run's best alias) -> the model section it trains
    written = {alias_uri(storage.join(job.run.storage_path, job.run_name), "best"): job.model
               for job in map(load_job, JOBS)}
    demo_serve = storage.join(inspect.signature(run_demo).parameters["output_dir"].default, SERVE_DIR)
    written[storage.join(demo_serve, "checkpoint")] = DEMO_JOB["model"]  # `make demo` copies its model there
    assert checkpoint in written, (checkpoint, sorted(written))
    # New categories are embedded with the word vectors given, else with the model's own only when they are built
    # in (sarl.model.serving.default_word_vectors); other vectors would pass (only the dimension is checked) but
    # place them in another space than the trained ones.
    model = dict(written[checkpoint])
    config = get_model_config(model.pop("name"), **model)
    vectors = app["args"].get("word_vectors")
    if config.semantic_source != "word":
        assert vectors is None  # CLIP text embeds the names: vectors would go unused
    elif is_builtin_word_vectors(config.word_vectors):
        assert vectors in (None, config.word_vectors)
    else:
        assert vectors == config.word_vectors, (vectors, config.word_vectors)
    if checkpoint.startswith(demo_serve):
        assert store == storage.join(demo_serve, "vocab_store")
    else:  # a store of the same bucket as the run (an operator pushes versions there with `sarl vocab push`)
        assert storage.is_s3(store) and storage.parse_s3(store)[0] == storage.parse_s3(checkpoint)[0]
