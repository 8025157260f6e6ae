"""nats-server processes started from the repository's own configs (compose, cluster), on free
loopback ports: the configs are tested as shipped, only ports and directories differ."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from dalston.bus.server import nats_server_binary
from tests.stack import free_port, wait_ok

NATS_DIR = Path(__file__).resolve().parent.parent / "nats"


class NatsNode:
    """One nats-server: `config` with `env` (the variables the config reads), JetStream data
    and log under `root`; the client and monitoring ports are picked free."""

    def __init__(self, root: Path, name: str, config: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.config = config
        self.store = root / name
        self.log = root / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.monitor_port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        # Command-line ports win over the config's, so several nodes share one machine.
        args = [nats_server_binary(), "-c", str(self.config), "-js", "-sd", str(self.store),
                "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port)]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Until /healthz answers 200: in a cluster, JetStream has a meta leader by then."""
        wait_ok(f"http://127.0.0.1:{self.monitor_port}/healthz",
                f"nats-server {self.name} not healthy; see {self.log}", timeout,
                alive=lambda: self.process.poll() is None)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(15)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")
