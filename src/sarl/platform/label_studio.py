"""A small client of Label Studio's REST API (1.23): projects, task import, storage connections, export, users.

**Why plain REST through httpx, not ``label-studio-sdk``.** ``pip install --dry-run label-studio-sdk`` into the
project's environment (Ray 2.x, numpy 2.4) would downgrade numpy to 2.2 and add 35 packages (opencv, nltk,
black, datamodel-code-generator, ...) for the eight endpoints used here; httpx is already installed beside Ray
(Serve and the benchmarks use it). The shapes below were read from Label Studio's own source
(``label_studio/projects``, ``data_import/api.py``, ``data_export/api.py``, ``io_storages/*``) and are exercised
against a real server by ``tests/integration/test_label_studio.py``.

**The token** is read from ``LABEL_STUDIO_API_KEY`` (or given by the caller) and only ever sent in the
``Authorization`` header: it is never written to a file, a log or an error message. A legacy API token (``Token
<key>``, Label Studio's ``--user-token``) is sent as it is; a personal access token (a JWT, the default of new
organisations) is first exchanged for a short-lived access token (``POST /api/token/refresh/``, ``Bearer``), and
again when that expires.

**Errors** are one :class:`LabelStudioError` line that names the server and the request, never the token: a wrong
URL (connection refused, DNS), a refused token (401), a request Label Studio rejects (its validation
message), and a server that stops answering in the middle of a response.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
TIMEOUT_S = 60.0  # an export of a large project takes a while; a dead server fails at once (connection refused)
PAGE_SIZE = 1000


class LabelStudioError(RuntimeError):
    """Label Studio cannot be reached, refuses the token, or rejects a request: a one-line message for the user."""


def token_from_env(token: str | None = None) -> str:
    """``token``, else ``$LABEL_STUDIO_API_KEY``; an error saying where to put it when neither is set."""
    token = token or os.environ.get(TOKEN_ENV, "")
    if not token.strip():
        raise LabelStudioError(f"no Label Studio token: set {TOKEN_ENV} (Account & Settings > Access Token)")
    return token.strip()


def _is_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("ey")


def _detail(response: httpx.Response) -> str:
    """Label Studio's own reason for refusing a request, on one line, shortened."""
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase
    if isinstance(body, dict):
        body = body.get("validation_errors") or body.get("detail") or body
    text = json.dumps(body) if not isinstance(body, str) else body
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


class LabelStudio:
    """One Label Studio server at ``url``, spoken to with ``token`` (see the module doc)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = TIMEOUT_S) -> None:
        if not url.startswith(("http://", "https://")):
            raise LabelStudioError(f"--label-studio must be an http(s):// URL, got {url!r}")
        self.url = url.rstrip("/")
        self._token = token_from_env(token)
        self._access: str | None = None
        self._http = httpx.Client(base_url=self.url, timeout=timeout, follow_redirects=True)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- transport
    def _auth(self, refresh: bool = False) -> dict[str, str]:
        if not _is_jwt(self._token):
            return {"Authorization": f"Token {self._token}"}
        if self._access is None or refresh:
            body = self._send("POST", "/api/token/refresh/", {"json": {"refresh": self._token}}, auth=False)
            self._access = body["access"]
        return {"Authorization": f"Bearer {self._access}"}

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """``method path`` with the token; the decoded JSON body (None when empty)."""
        try:
            return self._send(method, path, kwargs)
        except _Expired:
            return self._send(method, path, kwargs, refresh=True)

    def _send(self, method: str, path: str, kwargs: dict[str, Any], auth: bool = True, refresh: bool = False) -> Any:
        what = f"{method} {path}"
        try:
            headers = self._auth(refresh) if auth else {}
            response = self._http.request(method, path, headers=headers, **kwargs)
            content = response.read()
        except httpx.ConnectError as exc:
            raise LabelStudioError(f"cannot reach Label Studio at {self.url} ({what}): "
                                   f"{_reason(exc)}") from None
        except httpx.TimeoutException:
            raise LabelStudioError(f"Label Studio at {self.url} did not answer {what} within "
                                   f"{self._http.timeout.read:.0f} s") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise LabelStudioError(f"Label Studio at {self.url} stopped answering during {what}: "
                                   f"{_reason(exc)}") from None
        if response.status_code == 401 and auth and _is_jwt(self._token) and not refresh:
            raise _Expired
        if response.status_code == 401:
            source = "the given token" if auth else "the personal access token"
            raise LabelStudioError(f"Label Studio at {self.url} refused {source} (401 on {what}): check "
                                   f"{TOKEN_ENV}") from None
        if response.status_code >= 400:
            raise LabelStudioError(f"Label Studio at {self.url} refused {what}: {response.status_code} "
                                   f"{_detail(response)}") from None
        if not content.strip():
            return None
        try:
            return json.loads(content)
        except ValueError:
            raise LabelStudioError(f"Label Studio at {self.url} sent an incomplete or non-JSON answer to {what} "
                                   f"({len(content)} bytes): did it stop in the middle?") from None

    def _pages(self, path: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every item of a paginated list (``{count, next, results}``, or a plain list)."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            body = self.request("GET", path, params={**(params or {}), "page": page, "page_size": PAGE_SIZE})
            if isinstance(body, list):
                return out + body
            out += body.get("results", [])
            if not body.get("next"):
                return out
            page += 1

    # ------------------------------------------------------------------------------------------- the API
    def whoami(self) -> dict[str, Any]:
        """The token's user (checks URL and token in one request)."""
        return self.request("GET", "/api/current-user/whoami")

    def find_project(self, title: str) -> dict[str, Any] | None:
        """The project titled exactly ``title`` (Label Studio's filter is a substring match), or None."""
        matches = [p for p in self._pages("/api/projects", {"title": title}) if p.get("title") == title]
        if len(matches) > 1:
            ids = ", ".join(str(p["id"]) for p in matches)
            raise LabelStudioError(f"Label Studio at {self.url} has {len(matches)} projects titled {title!r} "
                                   f"(ids {ids}): rename all but one")
        return matches[0] if matches else None

    def create_project(self, title: str, label_config: str, description: str = "") -> dict[str, Any]:
        return self.request("POST", "/api/projects", json={"title": title, "label_config": label_config,
                                                           "description": description})

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        return self.request("PATCH", f"/api/projects/{project_id}", json=fields)

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Create ``tasks`` (``{data, predictions}``) in one synchronous import; their ids, in order."""
        if not tasks:
            return []
        body = self.request("POST", f"/api/projects/{project_id}/import", params={"return_task_ids": "true"},
                            json=tasks)
        return list(body.get("task_ids", []))

    def export(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project with its data and annotations: the JSON of Label Studio's "Export"."""
        body = self.request("GET", f"/api/projects/{project_id}/export",
                            params={"exportType": "JSON", "download_all_tasks": "true"})
        if not isinstance(body, list):
            raise LabelStudioError(f"Label Studio at {self.url} answered the export of project {project_id} with "
                                   f"something other than a task list")
        return body

    def users(self) -> dict[int, str]:
        """``{user id: email}`` of the organisation (annotations name their annotator by id)."""
        body = self.request("GET", "/api/users")
        items = body if isinstance(body, list) else body.get("results", [])
        return {int(u["id"]): u.get("email") or str(u["id"]) for u in items}

    def storages(self, kind: str, project_id: int) -> list[dict[str, Any]]:
        """The project's import storages of ``kind`` (``localfiles``, ``s3``)."""
        body = self.request("GET", f"/api/storages/{kind}", params={"project": project_id})
        return body if isinstance(body, list) else body.get("results", [])

    def create_storage(self, kind: str, project_id: int, **fields: Any) -> dict[str, Any]:
        """Connect an import storage so Label Studio can serve the tasks' images; never synced (the tasks are
        imported by :meth:`import_tasks`, not made from the storage's listing)."""
        return self.request("POST", f"/api/storages/{kind}", json={"project": project_id, **fields})


class _Expired(Exception):
    """A JWT access token that expired: refresh once and retry."""


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]


__all__ = ["LabelStudio", "LabelStudioError", "TOKEN_ENV", "token_from_env"]
