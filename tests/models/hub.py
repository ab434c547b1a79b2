"""A loopback HTTP server that plays the HuggingFace Hub for huggingface_hub's client.

It answers what `snapshot_download` asks (huggingface_hub 2.x):

* ``GET /api/models/{repo}/revision/{rev}``: the model's info (``sha``, ``siblings``);
* ``GET /api/models/{repo}/tree/{rev}?recursive=...``: the file listing (one page);
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}``: a file, with ``X-Repo-Commit``,
  ``ETag`` and ``Content-Length``; 404 with ``X-Error-Code`` for what is not there.

For the tests' sake a file can be *held* (half of it sent, then the answer waits
until `release`) or *cut* (half sent, then the connection closed), and every
request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class LoopbackHub:
    """The Hub on ``127.0.0.1:<port>``, serving each repository from a local directory."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.held: set[str] = set()
        self.cut: set[str] = set()
        #: Set once a held file's first half is sent.
        self.holding = threading.Event()
        self._release = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, *, body: bool) -> None:
                try:
                    hub._answer(self, body=body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client went (a killed manager)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def release(self) -> None:
        """Let held files finish."""
        self._release.set()

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}

    def _repo_and_rest(self, path: str, prefix: str, marker: str) -> tuple[str, str] | None:
        if not path.startswith(prefix) or f"/{marker}/" not in path:
            return None
        repo, rest = path[len(prefix) :].split(f"/{marker}/", 1)
        return repo, rest

    def _json(self, handler: BaseHTTPRequestHandler, value: object, body: bool) -> None:
        data = json.dumps(value).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _missing(self, handler: BaseHTTPRequestHandler, code: str, repo: str | None) -> None:
        data = json.dumps({"error": code}).encode()
        handler.send_response(404)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", code)
        if repo is not None and repo in self.repos:
            handler.send_header("X-Repo-Commit", self.commit(repo))
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _answer(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        found = self._repo_and_rest(path, "/api/models/", "revision")
        if found is not None:
            repo = found[0]
            if repo not in self.repos:
                return self._missing(handler, "RepoNotFound", None)
            siblings = [{"rfilename": name} for name in self.files(repo)]
            info = {"id": repo, "modelId": repo, "sha": self.commit(repo), "siblings": siblings}
            return self._json(handler, info, body)
        found = self._repo_and_rest(path, "/api/models/", "tree")
        if found is not None:
            repo = found[0]
            if repo not in self.repos:
                return self._missing(handler, "RepoNotFound", None)
            listing = [
                {
                    "type": "file",
                    "path": name,
                    "size": file.stat().st_size,
                    "oid": hashlib.sha1(file.read_bytes()).hexdigest(),
                }
                for name, file in self.files(repo).items()
            ]
            return self._json(handler, listing, body)
        found = self._repo_and_rest(path, "/", "resolve")
        if found is None:
            return self._missing(handler, "RepoNotFound", None)
        repo, rest = found
        if repo not in self.repos:
            return self._missing(handler, "RepoNotFound", None)
        filename = rest.split("/", 1)[1] if "/" in rest else ""
        file = self.files(repo).get(filename)
        if file is None:
            return self._missing(handler, "EntryNotFound", repo)
        data = file.read_bytes()
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", self.commit(repo))
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if not body:
            return None
        if filename in self.held or filename in self.cut:
            half = len(data) // 2
            handler.wfile.write(data[:half])
            handler.wfile.flush()
            if filename in self.cut:
                handler.close_connection = True
                return None
            self.holding.set()
            self._release.wait(120)
            handler.wfile.write(data[half:])
            return None
        handler.wfile.write(data)
        return None
