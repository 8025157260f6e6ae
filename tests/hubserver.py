"""A loopback stand-in for the Hugging Face Hub's file API, serving local folders as repos.

It answers what `huggingface_hub` 2.x asks when it downloads (see `HfApi.model_info` and
`file_download.get_hf_file_metadata`/`http_get`):

- `GET /api/models/{repo}[/revision/{rev}]` -> JSON with `id`, `sha` and `siblings`
  (`rfilename`, `size`, `blobId`);
- `HEAD|GET /{repo}/resolve/{rev}/{file}` -> the file, with `X-Repo-Commit`, `ETag`,
  `X-Linked-Size` and `Content-Length`; errors carry `X-Error-Code` as the Hub's do.

Tests can make it serve a file short (while the listing still gives the true size), slowly
(`rate` bytes a second), or fail every request, and read back which requests it got.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    """`with FakeHub() as hub: hub.add_repo("org/name", folder); os.environ["HF_ENDPOINT"] = hub.url`."""

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.short: dict[tuple[str, str], int] = {}
        self.failing = False
        self.rate: int | None = None  # bytes a second of each file body; None: at once
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        # A short poll interval keeps `shutdown` (and so each test's teardown) quick.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, folder: Path) -> None:
        self.repos[repo_id] = Path(folder)

    def serve_short(self, repo_id: str, filename: str, size: int) -> None:
        """Serve only the first `size` bytes of a file (the listing keeps its true size)."""
        self.short[(repo_id, filename)] = size

    def downloads(self, filename: str) -> int:
        """How many times a file's content was fetched (GET on its resolve URL)."""
        with self._lock:
            return sum(1 for method, path in self.requests
                       if method == "GET" and "/resolve/" in path and unquote(path).endswith("/" + filename))

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- what the handler asks -------------------------------------------------------------

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _files(self, repo_id: str) -> dict[str, Path]:
        folder = self.repos[repo_id]
        return {f.relative_to(folder).as_posix(): f for f in sorted(folder.rglob("*")) if f.is_file()}

    def _served_size(self, repo_id: str, name: str, path: Path) -> int:
        return self.short.get((repo_id, name), path.stat().st_size)


def _commit(repo_id: str) -> str:
    return hashlib.sha1(repo_id.encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, *_: object) -> None:  # quiet test output
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = urlsplit(self.path).path
        self.hub._record(self.command, path)
        if self.hub.failing:
            return self._error(500, "InternalError", "the fake hub was told to fail")
        if path.startswith("/api/models/"):
            return self._model_info(unquote(path.removeprefix("/api/models/")), body)
        if "/resolve/" in path:
            repo_id, _, rest = path.lstrip("/").partition("/resolve/")
            _revision, _, filename = rest.partition("/")
            return self._resolve(unquote(repo_id), unquote(filename), body)
        self._error(404, None, "not a Hub URL")

    def _model_info(self, rest: str, body: bool) -> None:
        repo_id = rest.partition("/revision/")[0]
        if repo_id not in self.hub.repos:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        siblings = [{"rfilename": name, "size": f.stat().st_size,
                     "blobId": hashlib.sha1(name.encode()).hexdigest()}
                    for name, f in self.hub._files(repo_id).items()]
        doc = json.dumps({"id": repo_id, "modelId": repo_id, "sha": _commit(repo_id),
                          "private": False, "siblings": siblings}).encode()
        self._send(200, {"Content-Type": "application/json"}, doc if body else None, len(doc))

    def _resolve(self, repo_id: str, filename: str, body: bool) -> None:
        if repo_id not in self.hub.repos:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        file = self.hub._files(repo_id).get(filename)
        if file is None:
            return self._error(404, "EntryNotFound", f"{filename} not in {repo_id}")
        size = self.hub._served_size(repo_id, filename, file)
        etag = hashlib.sha256(f"{repo_id}/{filename}:{size}".encode()).hexdigest()
        headers = {"X-Repo-Commit": _commit(repo_id), "ETag": f'"{etag}"', "X-Linked-Size": str(size),
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "none"}
        self._send(200, headers, None, size)
        if body:
            self._send_file(file, size)

    def _send_file(self, file: Path, size: int) -> None:
        rate = self.hub.rate
        block = 1 << 20 if rate is None else max(1, rate // 20)
        with open(file, "rb") as src:
            left = size
            while left > 0 and (chunk := src.read(min(left, block))):
                self.wfile.write(chunk)
                left -= len(chunk)
                if rate is not None:
                    time.sleep(len(chunk) / rate)

    def _error(self, status: int, code: str | None, message: str) -> None:
        doc = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, headers, doc if self.command != "HEAD" else None, len(doc))

    def _send(self, status: int, headers: dict[str, str], body: bytes | None, length: int) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if body is not None:
            self.wfile.write(body)


def closed_port_url() -> str:
    """A loopback URL nobody listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
