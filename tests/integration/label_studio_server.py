"""A real Label Studio server for the tests: started once per session, in the background, as soon as collection
shows that a test wants it (``pytest_collection_finish``, imported by conftest.py), so its start overlaps the
tests that run before it; the ``label_studio`` fixture waits for it.

- the server is ``label-studio start`` from ``.venv-ls`` (``scripts/install_label_studio.sh``: a virtual
  environment of its own, its dependencies are not Ray's), on 127.0.0.1 at a free port, with a SQLite data dir in
  a temporary folder, a known user, password and legacy API token (``--enable-legacy-api-token``), and local-files
  serving on, rooted at a folder the tests write images under;
- the data dir starts from the migrated template database the installer leaves in ``.venv-ls/template``: the
  server answers in about 4 s instead of migrating for 40-90 s (measured on 2 busy cores: 4.2 s against 43.7 s);
  without the template it migrates;
- no telemetry, no update check, no Sentry (sentry-sdk 3 also refuses Label Studio 1.23's options); local
  addresses allowed as S3 endpoints (moto's; Label Studio's SSRF guard refuses private subnets by default);
- it is stopped by the id of the process group it was started in (its own session): the server and any child,
  never by name.

``Annotator`` is the scripted annotator the tests answer tasks with, through the REST API the labelling UI uses.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import httpx

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("SARL_LABEL_STUDIO_VENV", REPO / ".venv-ls"))
EXECUTABLE = VENV / "bin" / "label-studio"
TEMPLATE = VENV / "template" / "label_studio.sqlite3"
HOST = "127.0.0.1"
USER = "annotator@sarl.test"
PASSWORD = "sarl-test-password"
TOKEN = "sarl0test0token0d41c8e2b7"  # a legacy API token (more than 5 characters, as Label Studio requires)
START_TIMEOUT_S = 300  # migrating without the template takes 90 s and more on a busy machine
FIXTURE = "label_studio"
# plain names Label Studio also reads as settings (get_env tries LABEL_STUDIO_X, HEARTEX_X, then X)
_DROPPED_ENV = ("HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "DATABASE_NAME", "BASE_DATA_DIR", "DEBUG")


class LabelStudio(NamedTuple):
    url: str
    token: str
    document_root: Path


def missing_reason() -> str | None:
    """Why no server can start here, or None."""
    if not EXECUTABLE.exists():
        return (f"Label Studio is not installed: {EXECUTABLE} is missing (sh scripts/install_label_studio.sh "
                f"{VENV.name}, or make test)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """One ``label-studio start`` process and its temporary folder."""

    def __init__(self, document_root: Path | None = None, venv: Path = VENV) -> None:
        """``document_root``: the folder local-files serving is rooted at (default: one in the server's temporary
        folder, removed with it); ``venv``: where ``label-studio`` is installed (scripts/annotation_budget.py
        starts its server with both)."""
        self.base = Path(tempfile.mkdtemp(prefix="sarl-label-studio-"))
        self.data_dir = self.base / "data"
        self.document_root = document_root or self.base / "files"
        self.data_dir.mkdir()
        self.document_root.mkdir(exist_ok=True)
        self.log = self.base / "server.log"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        template = venv / TEMPLATE.relative_to(VENV)
        self.used_template = template.exists()
        if self.used_template:
            shutil.copyfile(template, self.data_dir / "label_studio.sqlite3")
        env = {k: v for k, v in os.environ.items()
               if k not in _DROPPED_ENV and not k.startswith(("LABEL_STUDIO_", "HEARTEX_"))}
        env.update(LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir), LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
                   LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(self.document_root), LABEL_STUDIO_SENTRY_DSN="",
                   LABEL_STUDIO_FRONTEND_SENTRY_DSN="", LABEL_STUDIO_LATEST_VERSION_CHECK="false",
                   LABEL_STUDIO_COLLECT_ANALYTICS="false",
                   # moto listens on 127.0.0.1, which Label Studio's SSRF guard refuses as an S3 endpoint by default
                   # (as it refuses a MinIO on a private network: operators of one set the same)
                   LABEL_STUDIO_USE_DEFAULT_BANNED_SUBNETS="false")
        self.started = time.monotonic()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(venv / EXECUTABLE.relative_to(VENV)), "start", "--no-browser", "--internal-host", HOST,
                 "--port", str(self.port),
                 "--data-dir", str(self.data_dir), "--username", USER, "--password", PASSWORD,
                 "--user-token", TOKEN, "--enable-legacy-api-token", "--log-level", "WARNING"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.ready_after_s: float | None = None

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait(self, timeout: float = START_TIMEOUT_S) -> LabelStudio:
        """Block until the server answers ``/health``; an error with the end of its log if it died or is slow."""
        deadline = self.started + timeout
        while self.ready_after_s is None:
            if self.answers():
                self.ready_after_s = time.monotonic() - self.started
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                state = f"exited with {self.process.returncode}" if self.process.poll() is not None else \
                    f"did not answer within {timeout:.0f} s"
                raise RuntimeError(f"Label Studio at {self.url} {state}; end of {self.log}:\n{tail}")
            time.sleep(0.5)
        return LabelStudio(self.url, TOKEN, self.document_root)

    def stop(self) -> None:
        """End the server's process group (the server and its children), then remove its folder."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)


_session: dict[str, Server] = {}


def session_server() -> Server:
    """The session's server: the one the collection hook started, or one started now."""
    if "server" not in _session:
        _session["server"] = Server()
    return _session["server"]


def session_url() -> str | None:
    """The session server's URL once it is starting (the collection hook picks its port), else None: the Serve
    apps of the session name it in their ``label_studio`` args when they deploy."""
    server = _session.get("server")
    return server.url if server else None


def stop_session_server() -> None:
    server = _session.pop("server", None)
    if server is not None:
        server.stop()


def pytest_collection_finish(session) -> None:
    """Start the server in the background when a collected test uses the ``label_studio`` fixture."""
    if session.config.option.collectonly or missing_reason() is not None:
        return
    if any(FIXTURE in getattr(item, "fixturenames", ()) for item in session.items):
        session_server()
        session.config.add_cleanup(stop_session_server)


class Annotator:
    """Label Studio's API as the annotation UI uses it: read tasks, submit answers."""

    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=30,
                                 follow_redirects=True)  # as a browser follows a presigned S3 URL

    def project(self, title: str) -> dict:
        (project,) = [p for p in self.http.get("/api/projects", params={"page_size": 1000}).json()["results"]
                      if p["title"] == title]
        return project

    def tasks(self, title: str) -> list[dict]:
        response = self.http.get(f"/api/projects/{self.project(title)['id']}/export",
                                 params={"exportType": "JSON", "download_all_tasks": "true"})
        return sorted(response.raise_for_status().json(), key=lambda t: t["id"])

    def answer(self, task_id: int, control: str, choices: list[str]) -> None:
        result = [{"from_name": control, "to_name": "image", "type": "choices", "value": {"choices": choices}}]
        self.http.post(f"/api/tasks/{task_id}/annotations", json={"result": result}).raise_for_status()

    def image_bytes(self, task_id: int) -> bytes:
        """The task's image as the labelling UI loads it (Label Studio resolves storage URIs for it)."""
        url = self.http.get(f"/api/tasks/{task_id}").raise_for_status().json()["data"]["image"]
        return self.http.get(url).raise_for_status().content


class CuttingProxy:
    """A TCP proxy to the server that goes down in the middle of the first response to a request whose line
    contains ``cut_on`` (the export a pull reads): the client gets half of that response, then the connection and
    the listening socket close, as when the server dies mid-transfer; requests before it pass unchanged."""

    def __init__(self, target_url: str, cut_on: bytes = b"/export") -> None:
        import threading

        host, port = target_url.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.cut_on = cut_on
        self.listener = socket.create_server((HOST, 0))
        self.url = f"http://{HOST}:{self.listener.getsockname()[1]}"
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, responses: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if not responses and self.cut_on in chunk.split(b"\r\n", 1)[0]:
                    self.armed = True
                if responses and getattr(self, "armed", False):
                    sink.sendall(chunk[: len(chunk) // 2])
                    self.cut.set()
                    break
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):  # shutdown, not only close: the other direction's thread is blocked in recv
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            if self.cut.is_set():
                self.listener.close()

    def close(self) -> None:
        self.cut.set()
        self.listener.close()
