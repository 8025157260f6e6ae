"""A real Dalston for tests: a real nats-server and real service processes on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx

from dalston.bus.connection import Bus, connect
from dalston.bus.credentials import home_passwords, service_environment
from dalston.bus.server import EmbeddedNats
from dalston.config import Settings, load_settings
from dalston.contracts import Heartbeat, decode
from tests.audio_fixtures import AUDIO_DIR as AUDIO  # noqa: F401 - for the tests


def wait_ok(url: str, failure: str, timeout: float = 30.0,
            alive: Callable[[], bool] = lambda: True) -> None:
    """Until GET `url` answers 200; TimeoutError(`failure`) after `timeout`, RuntimeError as soon
    as `alive()` says the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(failure)
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(failure)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TestStack:
    """NATS plus whichever services a test starts, each a real `dalston serve` process."""

    __test__ = False  # a helper, not a test class

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        # Locked as `dalston up` locks it; the services and the tests connect as admin.
        passwords = home_passwords(root / "home")
        self.nats = EmbeddedNats(root / "nats", -1, passwords)
        self.http_port = free_port()
        self.env = {
            **os.environ,
            "DALSTON_HOME": str(root / "home"),
            "DALSTON_MODELS_DIR": str(root / "models"),
            "DALSTON_HTTP_PORT": str(self.http_port),
            "DALSTON_DEFAULT_MODEL": "faster-whisper-tiny.en",
            "DALSTON_TASK_ACK_WAIT": "3",
            "DALSTON_HEARTBEAT_INTERVAL": "1",
            "DALSTON_ENGINE_WAIT": "20",
            "DALSTON_LOG_LEVEL": "INFO",
            "HF_HUB_OFFLINE": "1",
            **service_environment(passwords, "admin"),
            **env,
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    @classmethod
    def running(cls, root: Path, *engines: str, **env: str) -> TestStack:
        """NATS, the pipeline and one faster-whisper engine per name in `engines`, all ready."""
        stack = cls(root, **env)
        stack.start_nats()
        stack.start_pipeline()
        for name in engines:
            stack.start_engine("faster-whisper", name)
        stack.wait_engines("audio-prepare", "merge", *engines)
        return stack

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def settings(self) -> Settings:
        return load_settings({k: v for k, v in self.env.items() if k.startswith("DALSTON_")})

    def start_nats(self) -> None:
        self.nats.start()
        self.env["DALSTON_NATS_URL"] = self.nats.url

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen:
        """Start `dalston serve ARGS` as `name`, its output in logs/<name>.log."""
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen([sys.executable, "-m", "dalston", "serve", *args],
                                   env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def start_engine(self, runtime: str, name: str | None = None, **env: str) -> subprocess.Popen:
        name = name or runtime
        return self.start(name, "engine", runtime, DALSTON_ENGINE_ID=name, **env)

    def start_pipeline(self) -> None:
        """Gateway, orchestrator, audio-prepare and merge: all but the transcription engines."""
        self.start("gateway", "gateway")
        self.start("orchestrator", "orchestrator")
        self.start_engine("audio-prepare")
        self.start_engine("merge")
        self.wait_http()

    def wait_http(self, timeout: float = 30.0) -> None:
        wait_ok(f"{self.url}/readyz", f"gateway not ready; see {self.logs}/gateway.log", timeout)

    def wait_engines(self, *names: str, timeout: float = 60.0, headers: dict[str, str] | None = None) -> None:
        """Until the engines `names` are live; `headers` carry a key where the gateway demands one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = {e["engine"] for e in httpx.get(f"{self.url}/v1/engines", headers=headers).json()["data"]
                    if e["status"] in ("idle", "busy")}
            if set(names) <= live:
                return
            time.sleep(0.2)
        raise TimeoutError(f"engines {names} not live; see {self.logs}")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name)
        process.send_signal(sig)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)
        self.nats.stop()

    async def bus(self) -> Bus:
        return await connect(self.settings, name="test")

    def log_text(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


async def heartbeat(bus: Bus, runtime: str, engine: str) -> Heartbeat:
    raw = await bus.js.get_last_msg("HEARTBEATS", f"heartbeat.{runtime}.{engine}")
    return decode(raw.data, Heartbeat)


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for comparing transcripts."""
    return "".join(c.lower() if c.isalnum() or c in " '" else " " for c in text).split()


DIALOGUE_WORDS = words("That was hilarious, I can't believe you said that. "
                       "What do you mean? I was really serious about it.")


def submit(stack: TestStack, path: Path, model: str) -> str:
    """POST /v1/jobs; the new job's id."""
    with open(path, "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/jobs", files={"file": audio}, data={"model": model})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job(stack: TestStack, job_id: str) -> dict:
    """The job's record; empty until the orchestrator has taken the submission."""
    response = httpx.get(f"{stack.url}/v1/jobs/{job_id}")
    return {"status": None, "tasks": {}} if response.status_code == 404 else response.json()


async def wait_job(stack: TestStack, job_id: str, timeout: float = 90.0) -> dict:
    """The job's record once it has ended."""
    async def ended():
        record = job(stack, job_id)
        return record if record["status"] in ("completed", "failed", "cancelled") else None
    return await wait_for(ended, timeout)


async def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise TimeoutError("condition not met in time")
