"""Settings, read once from `DALSTON_*` environment variables.

Every field of `Settings` is the variable `DALSTON_<FIELD>`; a bad value is an error that names
the variable, raised at start-up rather than deep inside a task.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

import msgspec
import platformdirs

# Hosts that listen on this machine alone: a service there is its one user's.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


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
    # The model that tells speakers apart where a request asks who spoke.
    diarize_model: str = "resemblyzer-ge2e"
    max_upload_mb: float = 1024.0
    # Longer audio is refused as invalid_audio (a small file can decode to hours: 4 h is
    # 0.9 GB of prepared audio a channel).
    max_audio_seconds: Annotated[float, msgspec.Meta(gt=0)] = 14400.0
    # Audio of more channels is down-mixed to mono; up to this many, each distinct channel is
    # transcribed on its own.
    max_channels: Annotated[int, msgspec.Meta(ge=1)] = 8
    # Audio longer than this is cut (at the quietest moment near each multiple) into pieces that
    # engines transcribe at once; see README for how the default was measured.
    chunk_seconds: Annotated[float, msgspec.Meta(ge=30.0)] = 60.0
    # faster-whisper decodes this many speech windows of a file at once (1: one at a time; 0: the
    # engine picks, 8 on CPU and 16 on a GPU). Faster and deterministic (README, Benchmarks).
    batch_size: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    # A segment ends at a pause this long (seconds), or at a sentence's end followed by a pause.
    segment_pause: Annotated[float, msgspec.Meta(gt=0)] = 0.8
    # ... and before it would run longer than this (seconds).
    max_segment_seconds: Annotated[float, msgspec.Meta(gt=0)] = 15.0
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
    # Jobs queued or running at once; past it new jobs are refused (429 with Retry-After).
    max_queued_jobs: int = 512
    # Uploads the gateway receives at once (each spools up to 1 MB in memory, the rest on
    # disk); more wait a few seconds for a slot, unread, then are refused (503, Retry-After).
    max_concurrent_uploads: int = 64
    # A request body that sends nothing for this many seconds is cut (408): a slow upload must
    # not hold its slot for as long as its socket stays open.
    body_timeout: Annotated[float, msgspec.Meta(gt=0)] = 20.0
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
    # Engines of each transcription runtime that `dalston up` starts (0: one per CPU core as
    # memory allows, with one thread each per core; one on a machine with a GPU).
    engines: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    # Models an engine holds at once, as memory allows (Ollama's default too).
    max_loaded_models: Annotated[int, msgspec.Meta(ge=1)] = 3
    # The memory an engine's loaded models may take, in GiB, counted by the catalog's
    # `hardware` figures (0: all of the device's: VRAM on a GPU, RAM on the CPU).
    model_memory_gb: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # Seconds a model stays loaded after its last task ends (negative: forever, 0: unloaded at once).
    keep_alive: float = -1.0
    # A model to load at start (public id), and whether it stays loaded whatever comes.
    preload_model: str = ""
    pin_preloaded: bool = False
    # Idle engines take tasks for a model they hold first (off only to measure what it buys).
    prefer_loaded: bool = True
    # The runtime model id a task that names none gets.
    default_model_id: str = ""
    # The key every webhook delivery is signed with (Standard Webhooks: `whsec_` + base64);
    # webhooks are refused while it is unset.
    webhook_secret: str = ""
    # How long a webhook delivery is retried (seconds after the job ended) before it is
    # dead-lettered.
    webhook_max_age: float = 86400.0
    # Seconds one delivery attempt may take.
    webhook_timeout: float = 10.0
    # Allow webhook targets on loopback and private networks (tests, one trusted network).
    webhook_allow_private: bool = False
    # Allow audio URLs (ElevenLabs' cloud_storage_url, source_url) on loopback and private
    # networks: the gateway would otherwise fetch from inside the network it runs in.
    fetch_allow_private: bool = False
    # How long fetching an audio URL may take (seconds), the whole download.
    fetch_timeout: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    # A URL fetch slower than this on average (KB/s, after its first few seconds) is cut: a
    # source that drips would hold its key's upload slot and queue place for DALSTON_FETCH_TIMEOUT.
    fetch_min_kb_per_second: Annotated[float, msgspec.Meta(gt=0)] = 16.0
    # The gateway's address as webhook receivers reach it (transcript links); empty means
    # http://<http_host>:<http_port>.
    public_url: str = ""
    # Live sessions an engine serves at once, beside its one batch task (0: none).
    max_sessions: int = 2
    # A live session whose client sent less than a second of audio in this many seconds is
    # ended, once the turns it committed are transcribed (a WebSocket that holds a slot with a
    # sliver of audio now and then, too); a Wyoming
    # connection that sends nothing for this long, too.
    session_idle_seconds: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    # Audio a live session may hold uncommitted (client commits) or in one turn (server VAD:
    # a turn this long is committed); past it, client commits get an error and the session closes.
    max_session_buffer_seconds: Annotated[float, msgspec.Meta(gt=0, le=600)] = 60.0
    # Realtime WebSockets one gateway keeps open at once; more are refused.
    max_realtime_connections: Annotated[int, msgspec.Meta(ge=1)] = 256
    # The Wyoming server for Home Assistant (`dalston serve wyoming`). Beyond loopback it needs
    # DALSTON_WYOMING_API_KEY (`dalston keys create`): the key its jobs run under, since
    # Wyoming itself carries no credentials.
    wyoming_host: str = "127.0.0.1"
    wyoming_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 10300
    wyoming_api_key: str = ""
    # Wyoming connections served at once; more are told the server is busy and closed.
    wyoming_max_connections: Annotated[int, msgspec.Meta(ge=1)] = 32

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

