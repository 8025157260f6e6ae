"""`dalston up`: Dalston on one machine.

Starts an embedded nats-server (JetStream on disk under DALSTON_HOME, open only to the users of
nats/accounts.conf, whose passwords DALSTON_HOME keeps) unless DALSTON_NATS_URL names one, then
the gateway, the Wyoming server for Home Assistant (as a NATS user it is the gateway; not where
it would listen beyond loopback without DALSTON_WYOMING_API_KEY), the orchestrator, the webhook
service (where DALSTON_WEBHOOK_SECRET is set), one engine of each pipeline runtime and the
transcription engines as child processes, each with its own NATS user. A child or the embedded
server that dies is restarted; Ctrl-C or SIGTERM stops everything, services before NATS.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psutil

from dalston.bus.credentials import ADMIN, engine_passwords, home_passwords, service_environment
from dalston.bus.permissions import engine_user
from dalston.bus.server import EmbeddedNats, HomeLock
from dalston.catalog import Catalog
from dalston.config import Settings
from dalston.logs import configure, get_logger
from dalston.services.engine_users import ADDED_ENGINES_FILE, added_engines, runtime_queues
from dalston.services.layout import apply_layout
from dalston.services.wyoming.server import listen_problem

log = get_logger("dalston.up")

# One engine each, whatever the transcription runtimes: every job's stages, diarization (which
# loads its model on first use, so a stack that never diarizes pays only an idle process) and
# redaction (rules, no model).
PIPELINE_RUNTIMES = ("audio-prepare", "merge", "diarize", "redact")
DEFAULT_RUNTIMES = ("faster-whisper",)
RESTART_DELAY = 2.0
# What one CPU engine needs beside the others: the default model (base) and its buffers.
ENGINE_MEMORY_BYTES = 1.5 * 2**30


def engine_layout(settings: Settings) -> tuple[int, int | None]:
    """How many engines of each transcription runtime to start, and their inference threads
    (None: as configured). Measured on 2 cores (bench/long_audio.py): one engine per core with one
    thread each beats one engine with every core, which gains nothing from a second thread; so on
    a machine without a GPU, one engine per core, as memory allows. A GPU is one engine's."""
    if settings.engines:
        return settings.engines, None
    if _on_gpu(settings):
        return 1, None
    cores = os.cpu_count() or 1
    engines = max(1, min(cores, int(psutil.virtual_memory().available // ENGINE_MEMORY_BYTES)))
    return engines, None if settings.cpu_threads else max(1, cores // engines)


def _on_gpu(settings: Settings) -> bool:
    return Path("/dev/nvidia0").exists() or settings.device == "cuda"


def embedded_nats(settings: Settings, engines: dict[str, str]) -> EmbeddedNats:
    """`dalston up`'s nats-server, for its services and `engines` (name -> runtime), each engine a
    NATS user of its own with a password made for this run; and for the engines `dalston engines
    add` made, which run elsewhere, with theirs."""
    added = {name: entry for name, entry in added_engines(settings.home / ADDED_ENGINES_FILE).items()
             if isinstance(entry.get("password"), str)}
    passwords = {**home_passwords(settings.home),
                 **{engine_user(name): entry["password"] for name, entry in added.items()},
                 **engine_passwords(map(engine_user, engines))}
    return EmbeddedNats(settings.home / "nats", settings.nats_port, passwords,
                        log_file=settings.home / "nats.log",
                        engines={**{name: entry["runtime"] for name, entry in added.items()}, **engines},
                        queues=runtime_queues(Catalog.from_settings(settings)))


def model_memory_share(settings: Settings, engines: int) -> str | None:
    """Each CPU engine's part of the machine's RAM for its models (DALSTON_MODEL_MEMORY_GB),
    where none is set: engines on one machine would otherwise each count all of it."""
    if settings.model_memory_gb or _on_gpu(settings):
        return None
    return f"{psutil.virtual_memory().total / max(1, engines) / 2**30:.2f}"


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
        self.nats_restarts = 0
        self.nats_started_at = 0.0
        self.children: list[Child] = []
        self._stop = False

    def _child_env(self, nats_url: str, nats_user: str, **extra: str) -> dict[str, str]:
        env = dict(os.environ, DALSTON_NATS_URL=nats_url, DALSTON_HOME=str(self.settings.home))
        if self.nats:
            env.update(service_environment(self.nats.passwords, nats_user))
        env.update(extra)
        return env

    def start(self) -> None:
        self.lock.acquire()
        engines = self._engines()
        nats_url = self.settings.nats_url
        if not nats_url:
            self.nats = embedded_nats(self.settings, {name: runtime for name, runtime, _ in engines})
            self._start_nats()
            nats_url = self.nats.url
        self.children.append(Child("gateway", ["serve", "gateway"], self._child_env(nats_url, "gateway")))
        if (problem := listen_problem(self.settings)) is None:
            self.children.append(Child("wyoming", ["serve", "wyoming"], self._child_env(nats_url, "gateway")))
        else:
            log.warning("wyoming server not started", reason=problem)
        self.children.append(Child("orchestrator", ["serve", "orchestrator"],
                                   self._child_env(nats_url, "orchestrator")))
        if self.settings.webhook_secret:  # without it the gateway refuses webhooks
            self.children.append(Child("webhooks", ["serve", "webhooks"],
                                       self._child_env(nats_url, "webhooks")))
        for name, runtime, extra in engines:
            engine_id = f"{name}-{os.getpid()}"
            self.children.append(Child(engine_id, ["serve", "engine", runtime], self._child_env(
                nats_url, engine_user(name), DALSTON_RUNTIME=runtime, DALSTON_ENGINE_ID=engine_id, **extra)))
        for child in self.children:
            child.start()

    def _engines(self) -> list[tuple[str, str, dict[str, str]]]:
        """The engines to start: name (their NATS user's, stable across runs), runtime, and
        settings of their own."""
        default = Catalog.from_settings(self.settings).model(self.settings.default_model)
        count, threads = engine_layout(self.settings)
        share = model_memory_share(self.settings, count * len(self.runtimes))
        engines = [(runtime, runtime, {}) for runtime in PIPELINE_RUNTIMES]
        for runtime in (r for r in self.runtimes if r not in PIPELINE_RUNTIMES):
            for n in range(count):
                # Engines that serve the default model pull and load it at start, so the first
                # request does not wait for a download.
                extra = {"DALSTON_PRELOAD_MODEL": default.id} if runtime == default.runtime else {}
                if threads:
                    extra["DALSTON_CPU_THREADS"] = str(threads)
                if share:
                    extra["DALSTON_MODEL_MEMORY_GB"] = share
                engines.append((f"{runtime}-{n}", runtime, extra))
        return engines

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
        if self.nats and self.nats.exit_code() is not None and not self._stop:
            self._restart_nats()
        for child in self.children:
            code = child.process.poll()
            if code is not None and not self._stop:
                child.restarts += 1
                log.warning("service died; restarting", service=child.name, exit_code=code,
                            restarts=child.restarts)
                _pace(child.started_at)
                child.start()

    def _restart_nats(self) -> None:
        """On its store and port: the services, reconnecting forever, carry on where they were."""
        self.nats_restarts += 1
        log.warning("nats-server died; restarting", exit_code=self.nats.exit_code(),
                    restarts=self.nats_restarts)
        _pace(self.nats_started_at)
        try:
            self._start_nats()
        except Exception as exc:  # noqa: BLE001 - not up, refused, a JetStream error: again later
            log.error("nats-server did not restart; trying again", error=repr(exc))

    def _start_nats(self) -> None:
        """The embedded server, with the layout applied as admin (the only user that may): its
        memory streams (HEARTBEATS) die with it, and the services may only read the layout."""
        self.nats_started_at = time.monotonic()
        self.nats.start()
        try:
            asyncio.run(self._apply_layout())
        except BaseException:
            self.nats.stop()
            raise

    async def _apply_layout(self) -> None:
        await apply_layout(msgspec.structs.replace(
            self.settings, nats_url=self.nats.url, nats_user=ADMIN, nats_password=self.nats.passwords[ADMIN]))

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


def _pace(started_at: float) -> None:
    """What dies at once after a start is restarted no more often than every RESTART_DELAY s."""
    if time.monotonic() - started_at < RESTART_DELAY:
        time.sleep(RESTART_DELAY)


def up(settings: Settings, runtimes: list[str]) -> int:
    # Its own lines (a service or NATS restarted) as structured as the services' beside them.
    configure(settings.log_level, settings.log_format)
    stack = Stack(settings, runtimes)
    stack.start()
    signal.signal(signal.SIGTERM, stack.request_stop)
    signal.signal(signal.SIGINT, stack.request_stop)
    try:
        if stack.wait_ready():
            wyoming = (f", Wyoming tcp://{settings.wyoming_host}:{settings.wyoming_port}"
                       if listen_problem(settings) is None else "")
            print(f"Dalston is up: http://{settings.http_host}:{settings.http_port}{wyoming} "
                  f"(NATS {stack.nats.url if stack.nats else settings.nats_url}; "
                  f"runtimes: {', '.join(runtimes)}). Ctrl-C stops it.", flush=True)
        stack.run_forever()
    finally:
        stack.stop()
    return 0
