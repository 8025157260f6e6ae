"""`dalston up`: Dalston on one machine.

Starts an embedded nats-server (JetStream on disk under DALSTON_HOME) unless DALSTON_NATS_URL
names one, then the gateway, the orchestrator and one engine per runtime as child processes.
A child that dies is restarted; Ctrl-C or SIGTERM stops everything, services before NATS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from dalston.bus.server import EmbeddedNats, HomeLock
from dalston.catalog import Catalog
from dalston.config import Settings
from dalston.logs import get_logger

log = get_logger("dalston.up")

PIPELINE_RUNTIMES = ("audio-prepare", "merge")
DEFAULT_RUNTIMES = ("faster-whisper",)
RESTART_DELAY = 2.0


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "dalston", *self.args], env=self.env)
        self.started_at = time.monotonic()


class Stack:
    def __init__(self, settings: Settings, runtimes: list[str]) -> None:
        self.settings = settings
        self.runtimes = runtimes
        self.lock = HomeLock(settings.home)
        self.nats: EmbeddedNats | None = None
        self.children: list[Child] = []
        self._stop = False

    def _child_env(self, nats_url: str, **extra: str) -> dict[str, str]:
        env = dict(os.environ, DALSTON_NATS_URL=nats_url, DALSTON_HOME=str(self.settings.home))
        env.update(extra)
        return env

    def start(self) -> None:
        self.lock.acquire()
        nats_url = self.settings.nats_url
        if not nats_url:
            self.nats = EmbeddedNats(self.settings.home / "nats", self.settings.nats_port,
                                     log_file=self.settings.home / "nats.log")
            self.nats.start()
            nats_url = self.nats.url
        self.children.append(Child("gateway", ["serve", "gateway"], self._child_env(nats_url)))
        self.children.append(Child("orchestrator", ["serve", "orchestrator"], self._child_env(nats_url)))
        default = Catalog.from_settings(self.settings).model(self.settings.default_model)
        for runtime in [*PIPELINE_RUNTIMES, *self.runtimes]:
            # The engine that serves the default model pulls and loads it at start, so the
            # first request does not wait for a download.
            preload = {"DALSTON_PRELOAD_MODEL": default.id} if runtime == default.runtime else {}
            self.children.append(Child(runtime, ["serve", "engine", runtime], self._child_env(
                nats_url, DALSTON_RUNTIME=runtime, DALSTON_ENGINE_ID=f"{runtime}-{os.getpid()}",
                **preload)))
        for child in self.children:
            child.start()

    def wait_ready(self, timeout: float = 60.0) -> bool:
        url = f"http://{self.settings.http_host}:{self.settings.http_port}/readyz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop:
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return True
            except OSError:
                pass
            self.supervise_once()
            time.sleep(0.2)
        return False

    def supervise_once(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None and not self._stop:
                child.restarts += 1
                log.warning("service died; restarting", service=child.name, exit_code=code,
                            restarts=child.restarts)
                if time.monotonic() - child.started_at < RESTART_DELAY:
                    time.sleep(RESTART_DELAY)
                child.start()

    def request_stop(self, *_: object) -> None:
        self._stop = True

    def run_forever(self) -> None:
        while not self._stop:
            self.supervise_once()
            time.sleep(0.5)

    def stop(self) -> None:
        self._stop = True
        for child in self.children:
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in self.children:
            if child.process:
                try:
                    child.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        if self.nats:
            self.nats.stop()
        self.lock.release()


def up(settings: Settings, runtimes: list[str]) -> int:
    stack = Stack(settings, runtimes)
    stack.start()
    signal.signal(signal.SIGTERM, stack.request_stop)
    signal.signal(signal.SIGINT, stack.request_stop)
    try:
        if stack.wait_ready():
            print(f"Dalston is up: http://{settings.http_host}:{settings.http_port} "
                  f"(NATS {stack.nats.url if stack.nats else settings.nats_url}; "
                  f"runtimes: {', '.join(runtimes)}). Ctrl-C stops it.", flush=True)
        stack.run_forever()
    finally:
        stack.stop()
    return 0
