"""The CLI's HTTP client for the gateway, and starting Dalston here when none runs (as Ollama does).

The server is `--server`, else `DALSTON_SERVER`, else the local gateway
(`http://DALSTON_HTTP_HOST:DALSTON_HTTP_PORT`). Only the local default is ever started: a server
someone named explicitly is theirs to run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from dalston.cli.output import CliError, StatusLine
from dalston.config import Settings
from dalston.contracts import TERMINAL, JobRecord, decode

# `dalston up` starts NATS and every service, and may import faster-whisper first: be patient.
START_TIMEOUT = 120.0
POLL_SECONDS = 0.25
# How long a job just submitted may take to be recorded by the orchestrator.
SUBMIT_GRACE = 30.0


def add_server_option(parser, default: Any = None) -> None:
    parser.add_argument("--server", metavar="URL", default=default,
                        help="the Dalston server (default: DALSTON_SERVER, else the local one)")


def server_url(args, settings: Settings) -> tuple[str, bool]:
    """The gateway's base URL, and whether the user named it (then it is never started here)."""
    named = getattr(args, "server", None) or settings.server
    if named:
        return named.rstrip("/"), True
    # A gateway listening on every interface is reached on loopback.
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host
    return f"http://{host}:{settings.http_port}", False


class ApiError(CliError):
    """The server answered with an error; `status` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Client:
    """Calls to the gateway; every failure becomes a `CliError` with the server's own words."""

    def __init__(self, url: str, api_key: str = "", timeout: float = 60.0) -> None:
        self.url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, timeout=timeout, headers=headers)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the Dalston server at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise ApiError(_api_message(response), response.status_code)
        return response

    def events(self, path: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """The Server-Sent Events a POST to `path` answers with, each data line's JSON; an error
        event (OpenAI's shape) becomes an ApiError."""
        try:
            with self.http.stream("POST", path, timeout=None, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(_api_message(response), response.status_code)
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        if "error" in event:
                            raise ApiError(event["error"].get("message", "the server failed"), 500)
                        yield event
        except httpx.HTTPError as exc:
            raise CliError(f"lost the Dalston server at {self.url}: {exc}") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params).json()

    def ready(self) -> bool:
        return self._ok("/readyz")

    def answers(self) -> bool:
        """A gateway runs there, ready or not (a stalled orchestrator makes it unready; the
        commands still work, and say what they meet)."""
        return self._ok("/healthz")

    def _ok(self, path: str) -> bool:
        try:
            return self.http.get(path, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def job(self, job_id: str) -> JobRecord:
        return decode(self.request("GET", f"/v1/jobs/{job_id}").content, JobRecord)

    def wait(self, job_id: str, on_update: Callable[[JobRecord], None] = lambda r: None,
             unrecorded_grace: float = 0.0) -> JobRecord:
        """Poll the job until it ends; `on_update` sees every state on the way. A job submitted
        a moment ago may not be recorded yet: its 404s are waited out for `unrecorded_grace` s."""
        deadline = time.monotonic() + unrecorded_grace
        while True:
            try:
                record = self.job(job_id)
            except ApiError as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
            else:
                if record.status in TERMINAL:
                    return record
                on_update(record)
            time.sleep(POLL_SECONDS)

    def transcript(self, job_id: str, fmt: str) -> str:
        return self.request("GET", f"/v1/jobs/{job_id}/transcript", params={"format": fmt}).text


def _api_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code} from {response.request.url}: {response.text[:200]}"


def probe(args, settings: Settings) -> Client | None:
    """The gateway if one answers now, else None (for commands that manage without one)."""
    client = Client(server_url(args, settings)[0], settings.api_key)
    return client if client.answers() else None


def connect(args, settings: Settings, *, start: bool = False) -> Client:
    """A gateway that answers; with `start`, the local one is started if it is not running."""
    url, named = server_url(args, settings)
    client = Client(url, settings.api_key)
    if client.answers():
        return client
    if named or not start:
        raise CliError(f"no Dalston server answers at {url}" + ("" if named else "; start one with `dalston up`"))
    _start_local(settings, client)
    return client


def _start_local(settings: Settings, client: Client) -> None:
    """`dalston up` as a detached background process (its output in DALSTON_HOME/up.log),
    then wait until its gateway is ready."""
    settings.home.mkdir(parents=True, exist_ok=True)
    log_path = settings.home / "up.log"
    with log_path.open("ab") as log:
        # A session of its own: the server outlives this command and ignores its Ctrl-C.
        process = subprocess.Popen([sys.executable, "-m", "dalston", "up"], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    with StatusLine() as line:
        while not client.ready():
            if process.poll() is not None:
                raise CliError(f"`dalston up` stopped (exit {process.returncode}); see {log_path}")
            if time.monotonic() > deadline:
                raise CliError(f"Dalston was not ready within {START_TIMEOUT:.0f} s; see {log_path}")
            line.show(f"starting Dalston at {client.url} (log: {log_path})")
            time.sleep(POLL_SECONDS)
