"""A real two-node Ray cluster on one machine whose nodes do not share a disk: the test cluster of issue 10.

- **head**: ``ray start --head --num-cpus=0`` (nothing CPU-bound is scheduled there, as on the shipped KubeRay shape),
  its own ``--temp-dir``; the driver (tests, ``sarl``) connects to it with ``ray.init(address="127.0.0.1:PORT")``.
- **worker**: ``ray start --address 127.0.0.1:PORT --num-cpus=N`` inside its own mount namespace
  (``unshare --mount --propagation private``, needs root) with a fresh tmpfs over ``/tmp`` (scratch, ``tempfile``,
  its Ray session directory) and over ``~/.cache`` (the node cache, ``sarl.platform.node_cache``). A path the driver
  writes there does not exist on the worker, and what the worker downloads the driver never sees.

Every Ray address is on 127.0.0.1 and every port is a free one picked here, so the cluster coexists with other Ray
instances on the machine. Token authentication is off (``RAY_AUTH_MODE=disabled`` for the nodes; the driver needs it
too). The nodes take the rest of their environment (``AWS_*``: endpoint and keys of an S3 server started before them)
from the process that starts them, as the nodes of a real cluster take theirs from their pods.

``stop`` ends exactly the processes ``start`` started (each ``ray start --block`` is a process-group leader; its
group and every descendant, by pid), never ``ray stop``, which would end every Ray instance on the machine.

From a shell (the repository root; ``scripts/two_node_cluster.sh`` wraps this)::

    python tests/integration/two_node.py start [--worker-cpus 2]   # prints the exports for a driver
    python tests/integration/two_node.py status
    python tests/integration/two_node.py stop
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
READY = "Ray runtime started."
STATE_FILE = Path(os.environ.get("SARL_TWO_NODE_STATE", Path(tempfile.gettempdir()) / "sarl-two-node.json"))
WORKER_TEMP_DIR = "/tmp/ray-worker"  # inside the worker's private /tmp
# `ray start` waits a fixed 30 s for its raylet to register with the GCS and exits when a loaded machine (a test
# suite on 2 cores) takes longer: the node is started again.
START_ATTEMPTS = 3
# The driver's copies would hide the worker's own; the nodes find the cluster by its address, not these.
_DROPPED_ENV = ("RAY_ADDRESS", "SARL_CACHE_DIR", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclass
class TwoNodeCluster:
    address: str  # 127.0.0.1:PORT of the head's GCS
    base_dir: str  # the head's temp dir and the start logs (on the driver's disk)
    worker_cpus: int
    pids: dict[str, int] = field(default_factory=dict)  # node -> pid of its `ray start --block` (a group leader)

    @property
    def env(self) -> dict[str, str]:
        """What a driver sets to use the cluster."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _ports(head: bool) -> list[str]:
    """Free ports for everything a node would otherwise take at a fixed default (52365, 10001 ...)."""
    ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    if head:
        ports.append("--ray-client-server-port")
    return [arg for flag in ports for arg in (flag, str(free_port()))]


def _node_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def _ray() -> str:
    """The `ray` command of this interpreter's environment."""
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def _wait_started(name: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if READY in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the {name} node's `ray start` exited with {proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"the {name} node did not start within {timeout:.0f} s; its log {log}:\n"
                       f"{log.read_text(errors='replace')[-4000:] if log.exists() else '(none)'}")


def start(worker_cpus: int = 2, env: dict[str, str] | None = None, timeout: float = 180,
          object_store_bytes: int = 400 * 1024**2) -> TwoNodeCluster:
    """Start the head, then the worker in its private mount namespace; return once both say they started.

    ``env``: extra environment for both nodes (on top of this process's, less ``_DROPPED_ENV``).
    """
    if os.geteuid() != 0 or not shutil.which("unshare"):
        raise RuntimeError("the two-node test cluster needs root and unshare(1) (a private mount namespace)")
    base = Path(tempfile.mkdtemp(prefix="s2n-"))  # short: Ray's socket paths live under it
    port = free_port()
    cluster = TwoNodeCluster(address=f"{HOST}:{port}", base_dir=str(base), worker_cpus=worker_cpus)
    node_env = _node_env(env)
    store = ["--object-store-memory", str(object_store_bytes)]
    head = [_ray(), "start", "--head", "--block", "--node-ip-address", HOST, "--port", str(port), "--num-cpus", "0",
            "--include-dashboard", "true", "--dashboard-host", HOST, "--dashboard-port", str(free_port()),
            "--disable-usage-stats", "--temp-dir", str(base / "head"),
            *store, *_ports(head=True)]
    worker = [_ray(), "start", "--block", "--address", cluster.address, "--node-ip-address", HOST,
              "--num-cpus", str(worker_cpus), "--disable-usage-stats", "--temp-dir", WORKER_TEMP_DIR,
              *store, *_ports(head=False)]
    cache = Path(node_env.get("HOME", str(Path.home()))) / ".cache"
    cache.mkdir(parents=True, exist_ok=True)  # a mount point; the driver's own content stays hidden under it
    private = (f"mount -t tmpfs -o size=4g,mode=1777 sarl-worker-tmp /tmp && "
               f"mount -t tmpfs -o size=2g sarl-worker-cache {shlex.quote(str(cache))} && exec \"$@\"")
    try:
        for name, argv in (("head", head),
                           ("worker", ["unshare", "--mount", "--propagation", "private", "sh", "-c", private, "sh",
                                       *worker])):
            for attempt in range(1, START_ATTEMPTS + 1):
                log = base / f"{name}.log"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=node_env, start_new_session=True)
                cluster.pids[name] = proc.pid
                try:
                    _wait_started(name, proc, log, timeout)
                    break
                except RuntimeError:  # `ray start` gave up: it allows a raylet 30 s to register, fixed
                    if attempt == START_ATTEMPTS:
                        raise
                    _stop_node(cluster, name)
                    log.rename(base / f"{name}.attempt{attempt}.log")
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal(pids: list[int], groups: list[int], sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_node(cluster: TwoNodeCluster, name: str, grace: float = 5) -> None:
    """End one node's `ray start` group and every descendant of it, by pid (SIGTERM, then SIGKILL)."""
    leader = cluster.pids.pop(name, None)
    if leader is None:
        return
    pids = [leader, *_descendants(leader)]  # before any dies: their children are reparented then
    _signal(pids, [leader], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    survivors = [p for p in pids if _alive(p)]
    if survivors:
        _signal(survivors, [], signal.SIGKILL)
    try:
        os.waitpid(leader, os.WNOHANG)  # reap it when this process is its parent (the fixture)
    except ChildProcessError:
        pass


def stop(cluster: TwoNodeCluster, grace: float = 5) -> None:
    """End the worker node, then the head: each `ray start` group and every descendant of it, by pid (SIGTERM,
    then SIGKILL for what is left after ``grace`` seconds: the head's GCS lingers for longer)."""
    for name in ("worker", "head"):
        _stop_node(cluster, name, grace)
    shutil.rmtree(cluster.base_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ command line
def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--worker-cpus", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "start":
        if STATE_FILE.exists():
            print(f"{STATE_FILE} exists: a cluster started here may still run; `stop` it first", file=sys.stderr)
            return 1
        cluster = start(args.worker_cpus)
        STATE_FILE.write_text(json.dumps(asdict(cluster)))
        print(f"two-node cluster at {cluster.address} (head pid {cluster.pids['head']}, worker pid "
              f"{cluster.pids['worker']}); for a driver:")
        print(" ".join(f"export {k}={v};" for k, v in cluster.env.items()))
        return 0
    if not STATE_FILE.exists():
        print("no cluster started from here", file=sys.stderr)
        return 1 if args.command == "status" else 0
    cluster = TwoNodeCluster(**json.loads(STATE_FILE.read_text()))
    if args.command == "status":
        alive = {name: _alive(pid) for name, pid in cluster.pids.items()}
        print(json.dumps({"address": cluster.address, "alive": alive}))
        return 0 if all(alive.values()) else 1
    stop(cluster)
    STATE_FILE.unlink()
    print(f"stopped the cluster at {cluster.address}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
