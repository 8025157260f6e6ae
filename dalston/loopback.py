"""A real Dalston on loopback, driven from Python: a nats-server and `dalston serve` processes
on free 127.0.0.1 ports, under one temporary folder. The tests, the benchmarks and the
scripts start what they measure with it."""

from __future__ import annotations

import atexit
import os
import random
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
from dalston.contracts import HEARTBEAT_SUBJECT, HEARTBEATS_STREAM, Heartbeat, decode


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
    """A port nothing listens on, below the kernel's ephemeral range: a port the kernel hands out
    for port 0 is in that range, and can go to an outgoing connection before the service that
    was to listen on it binds it (a gateway failed to start so, once in a suite run)."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768  # Linux's default start
    while True:
        port = random.randrange(10_000, max(10_001, ephemeral))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken: another
            return port


class LoopbackStack:
    """NATS plus whichever services the caller starts, each a real `dalston serve` process."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        # Locked as `dalston up` locks it; the services and the caller connect as admin.
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
        # A caller whose start failed half-way never closes it: its processes end with ours.
        atexit.register(self.close)

    @classmethod
    def running(cls, root: Path, *engines: str, **env: str) -> LoopbackStack:
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

    def stop(self, *names: str, sig: int = signal.SIGTERM) -> None:
        """Signal the services `names` together, then wait for each (killed past 15 s)."""
        processes = [self.processes.pop(name) for name in names]
        for process in processes:
            process.send_signal(sig)
        deadline = time.monotonic() + 15
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        self.stop(*self.processes)
        self.nats.stop()

    async def bus(self) -> Bus:
        return await connect(self.settings, name="loopback")

    def log_text(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


async def heartbeat(bus: Bus, runtime: str, engine: str) -> Heartbeat:
    """The engine's last heartbeat, whichever NATS user it has."""
    raw = await bus.last(HEARTBEATS_STREAM, HEARTBEAT_SUBJECT.format(runtime=runtime, identity="*", engine=engine))
    return decode(raw, Heartbeat)
