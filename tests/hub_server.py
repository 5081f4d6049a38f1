"""A local stand-in for the Hugging Face Hub: an HTTP server on 127.0.0.1 that speaks the routes the real
huggingface_hub client uses to create a repo, commit files and download them again, and keeps what it receives.

Tests point HF_ENDPOINT at it, so pushing goes through the real client over real HTTP.
`fail` makes a route answer with an error status (e.g. {"commit": 500}) to test failures mid-upload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USER = "tester"


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


class LocalHub:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []  # "METHOD path" of every request, in order
        self.fail: dict[str, int] = {}  # route name -> HTTP status to answer with
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                hub._dispatch(self, "POST")

            def do_GET(self) -> None:
                hub._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                hub._dispatch(self, "HEAD")

        return Handler

    # --- routing -------------------------------------------------------------------------------------------

    ROUTES = [
        ("POST", re.compile(r"^/api/repos/create$"), "create"),
        ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
        ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$"), "preupload"),
        ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$"), "commit"),
        ("GET", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$"), "info"),
        ("GET", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)$"), "tree"),
        ("GET", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "download"),
        ("HEAD", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "download"),
    ]

    def _dispatch(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path = handler.path.split("?")[0]
        self.requests.append(f"{method} {path}")
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        found = next(((name, pattern.match(path)) for route_method, pattern, name in self.ROUTES
                      if route_method == method and pattern.match(path)), None)
        if found is None:
            return self._reply(handler, 404, {"error": f"no route {method} {path}"})
        name, match = found
        if name in self.fail:
            return self._reply(handler, self.fail[name], {"error": f"injected failure on {name}"})
        writes = name in ("create", "preupload", "commit")
        if writes and handler.headers.get("Authorization") != f"Bearer {self.token}":
            return self._reply(handler, 401, {"error": "Invalid credentials in Authorization header"})
        status, payload, headers = getattr(self, f"_{name}")(body=body, **match.groupdict())
        self._reply(handler, status, payload, headers, head=method == "HEAD")

    @staticmethod
    def _reply(handler, status: int, payload, headers: dict | None = None, head: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if status >= 400:
            handler.send_header("X-Error-Message", json.loads(data).get("error", "") if not isinstance(payload, bytes) else "")
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if not head:
            handler.wfile.write(data)

    # --- routes ----------------------------------------------------------------------------------------------

    def _create(self, body: bytes, **_) -> tuple:
        request = json.loads(body)
        repo_id = f"{request.get('organization') or USER}/{request['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, None
        self.repos[repo_id] = Repo(private=request.get("visibility") == "private" or bool(request.get("private")))
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, None

    def _validate_yaml(self, **_) -> tuple:
        return 200, {}, None

    def _preupload(self, repo: str, body: bytes, **_) -> tuple:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                               for f in files]}, None

    def _commit(self, repo: str, body: bytes, **_) -> tuple:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        received = {}
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                received[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        store = self.repos[repo]
        store.files.update(received)  # all files of a commit land together
        store.commits.append(hashlib.sha1(body).hexdigest())
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{store.sha}", "commitOid": store.sha}, None

    def _info(self, repo: str, **_) -> tuple:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        store = self.repos[repo]
        return 200, {"id": repo, "modelId": repo, "sha": store.sha, "private": store.private,
                     "siblings": [{"rfilename": name} for name in sorted(store.files)]}, None

    def _tree(self, repo: str, **_) -> tuple:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        return 200, [{"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                     for name, content in sorted(self.repos[repo].files.items())], None

    def _download(self, repo: str, path: str, **_) -> tuple:
        store = self.repos.get(repo)
        if store is None or path not in store.files:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
        content = store.files[path]
        return 200, content, {"X-Repo-Commit": store.sha, "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}
