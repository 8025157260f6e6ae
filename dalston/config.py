"""Settings, read once from `DALSTON_*` environment variables.

Every field of `Settings` is the variable `DALSTON_<FIELD>`; a bad value is an error that names
the variable, raised at start-up rather than deep inside a task.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import msgspec
import platformdirs


class ConfigError(ValueError):
    """A `DALSTON_*` variable holds a value that cannot be used."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # Where an embedded NATS keeps JetStream data, and the default model store.
    home_dir: str = msgspec.field(default=platformdirs.user_data_dir("dalston"), name="home")
    # An existing NATS to use; empty means `dalston up` starts one.
    nats_url: str = ""
    nats_port: int = 4222
    # Credentials for NATS, where the server demands them.
    nats_user: str = ""
    nats_password: str = ""
    # Replicas of every stream: 1 on one server, 3 on a cluster.
    nats_replicas: int = 1
    http_host: str = "127.0.0.1"
    # Demand API keys even on loopback (beyond loopback they are always demanded).
    require_auth: bool = False
    http_port: int = 8000
    # The gateway the CLI talks to; empty means http://<http_host>:<http_port>.
    server: str = ""
    # The API key the CLI sends (`dalston keys create`), where the gateway demands one.
    api_key: str = ""
    models_dir: str = ""
    # A catalog folder (runtimes/ and models/) to use instead of the bundled one.
    catalog_dir: str = ""
    default_model: str = "faster-whisper-base"
    max_upload_mb: float = 1024.0
    # How long audio, results and finished jobs' events are kept.
    retention_hours: float = 168.0
    # A task's ack deadline; engines refresh it while they work.
    task_ack_wait: float = 30.0
    # Deliveries of one task (crashed engines included) before it is failed.
    task_max_deliver: int = 4
    # Attempts of a task that failed for a transient reason.
    task_max_attempts: int = 3
    # How long a task waits for a live engine of its runtime before its job fails.
    engine_wait: float = 120.0
    # How long the OpenAI-compatible endpoint waits for its job.
    request_timeout: float = 3600.0
    heartbeat_interval: float = 2.0
    log_level: str = "WARNING"
    log_format: str = "text"
    # Engine settings (runtime actors).
    runtime: str = ""
    engine_id: str = ""
    device: str = "auto"
    compute_type: str = "default"
    cpu_threads: int = 0
    max_loaded_models: int = 1
    # Seconds a model stays loaded after its last task ends (negative: forever, 0: unloaded at once).
    keep_alive: float = -1.0
    # A model to load at start (public id), and whether it stays loaded whatever comes.
    preload_model: str = ""
    pin_preloaded: bool = False
    # Idle engines take tasks for a model they hold first (off only to measure what it buys).
    prefer_loaded: bool = True
    # The runtime model id a task that names none gets.
    default_model_id: str = ""
    # Live sessions an engine serves at once, beside its one batch task (0: none).
    max_sessions: int = 2
    # A live session whose client sent nothing for this many seconds is ended.
    session_idle_timeout: float = 60.0

    @property
    def home(self) -> Path:
        return Path(self.home_dir).expanduser()

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir).expanduser() if self.models_dir else self.home / "models"

    @property
    def engine_name(self) -> str:
        return self.engine_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def nats_servers(self) -> list[str]:
        url = self.nats_url or f"nats://127.0.0.1:{self.nats_port}"
        return [u.strip() for u in url.split(",") if u.strip()]


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Settings from `environ` (default: the process environment)."""
    env = os.environ if environ is None else environ
    raw = {}
    for field in msgspec.structs.fields(Settings):
        value = env.get(f"DALSTON_{field.encode_name.upper()}")
        if value is not None and value != "":
            raw[field.encode_name] = value
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec says "... at `$.http_port`": name the variable the user set instead.
        message = str(exc)
        for field in raw:
            message = message.replace(f"`$.{field}`", f"DALSTON_{field.upper()}")
        raise ConfigError(message) from None

