"""Wire contracts: every message that crosses NATS, as msgspec structs.

This module is the bottom layer: it imports nothing of Dalston. Unknown fields are ignored
(so old readers survive new writers); a missing or mistyped field is a `ContractError` that
says which. `python -m dalston.contracts` prints the JSON schemas, so a client in any language
can publish a job.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Annotated, Any, Literal, TypeVar

import msgspec

# --- subjects, streams, buckets ------------------------------------------------------------

SUBMIT_SUBJECT = "jobs.submit"
CANCEL_SUBJECT = "jobs.cancel"
TASK_EVENT_SUBJECT = "events.task.{job_id}"
JOB_EVENT_SUBJECT = "events.job.{job_id}"
TASK_SUBJECT = "tasks.{runtime}.{model}"
HEARTBEAT_SUBJECT = "heartbeat.{runtime}.{engine}"
DEADLETTER_SUBJECT = "deadletter.{source}"
PULL_SUBJECT = "models.pull.{model}"
PULL_PROGRESS_SUBJECT = "models.progress.{model}"

JOBS_STREAM = "JOBS"
TASKS_STREAM = "TASKS"
EVENTS_STREAM = "EVENTS"
HEARTBEATS_STREAM = "HEARTBEATS"
DEADLETTER_STREAM = "DEADLETTER"
JOBS_BUCKET = "jobs"
ARTIFACTS_BUCKET = "artifacts"

# The model token of tasks whose runtime needs no model (audio-prepare, merge).
NO_MODEL = "none"

_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def subject_token(value: str) -> str:
    """`value` as one subject token (and consumer-name part): dots and the like become `_`."""
    return _TOKEN_UNSAFE.sub("_", value) or "_"


def task_subject(runtime: str, runtime_model_id: str | None) -> str:
    return TASK_SUBJECT.format(runtime=subject_token(runtime),
                               model=subject_token(runtime_model_id or NO_MODEL))


def task_consumer_prefix(runtime: str) -> str:
    return f"tasks-{subject_token(runtime)}-"


def task_consumer(runtime: str, runtime_model_id: str | None) -> str:
    """The durable pull consumer that every engine of `runtime` shares for one model."""
    return task_consumer_prefix(runtime) + subject_token(runtime_model_id or NO_MODEL)


class ContractError(ValueError):
    """A message that does not fit its contract; the text says which field and why."""


class Contract(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Base of every wire message. Every field is always written, defaults too, so a reader
    in any language sees the whole shape (a queued job says `"status": "queued"`)."""


T = TypeVar("T", bound=Contract)
_encoder = msgspec.json.Encoder()


def encode(message: Contract) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ContractError(f"not a valid {kind.__name__}: {exc}") from None


def now() -> float:
    return time.time()


# --- jobs ------------------------------------------------------------------------------------

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
TaskStatus = Literal["pending", "queued", "running", "completed", "failed", "cancelled"]
Stage = Literal["prepare", "transcribe", "merge"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

# Job ids become subject tokens and object names, so they are kept to a safe alphabet.
JobId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class TranscribeOptions(Contract, kw_only=True):
    """What the user asked of the transcription; travels unchanged to the engine."""

    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False
    # Voice activity detection: on by default, so silence is not hallucinated into words.
    vad: bool = True
    beam_size: int = 5


class JobRequest(Contract, kw_only=True):
    """Published on `jobs.submit` by the gateway or by any NATS client.

    The audio is either inline (`audio`, base64 in JSON; small files) or an object already in
    the `artifacts` object store (`audio_object`). The client picks `id`, so it can subscribe to
    `events.job.<id>` before it publishes.

    `owner` is the name of the API key the job belongs to: the gateway sets it from the key it
    verified, and only that key (or an admin key) may see, read or cancel the job. A NATS client
    sets it as it likes, so NATS permissions on `jobs.submit` guard who may claim an owner; a job
    without one is visible to admin keys only (or to everyone where the gateway demands no keys).
    """

    id: JobId
    model: str = ""
    audio: bytes | None = None
    audio_object: str | None = None
    filename: str = ""
    options: TranscribeOptions = msgspec.field(default_factory=TranscribeOptions)
    submitted_at: float = 0.0
    owner: str | None = None


class CancelRequest(Contract, kw_only=True):
    """Published on `jobs.cancel`."""

    id: JobId
    reason: str = "cancelled by user"


class Failure(Contract, kw_only=True):
    """Why something failed, in words a user can act on."""

    code: str  # invalid_audio, unknown_model, no_engine, model_unavailable, internal, ...
    message: str
    retryable: bool = False


class TaskRecord(Contract, kw_only=True):
    """One task of a job's DAG, as the orchestrator tracks it."""

    id: str
    stage: Stage
    runtime: str
    channel: int | None = None
    status: TaskStatus = "pending"
    attempt: int = 0
    engine: str | None = None
    outputs: list[str] = []
    failure: Failure | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None


class JobRecord(Contract, kw_only=True):
    """A job's state, in the `jobs` key-value bucket (key = job id)."""

    id: str
    status: JobStatus = "queued"
    model: str
    runtime: str
    runtime_model_id: str
    options: TranscribeOptions = msgspec.field(default_factory=TranscribeOptions)
    audio_object: str
    filename: str = ""
    tasks: dict[str, TaskRecord] = {}
    channels: int | None = None
    duration: float | None = None
    language: str | None = None
    transcript_object: str | None = None
    failure: Failure | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None
    owner: str | None = None  # the API key's name, from the JobRequest


class JobEvent(Contract, kw_only=True):
    """Published on `events.job.<id>` whenever a job changes status."""

    job_id: str
    status: JobStatus
    transcript_object: str | None = None
    failure: Failure | None = None
    at: float = 0.0


# --- tasks -----------------------------------------------------------------------------------


class Task(Contract, kw_only=True):
    """One unit of work on `tasks.<runtime>.<model>`, for any engine of that runtime."""

    id: str
    job_id: str
    stage: Stage
    runtime: str
    # The model the engine must hold (None for runtimes without models).
    model: str | None = None
    runtime_model_id: str | None = None
    inputs: list[str] = []
    # Object-store name prefix for what the task writes.
    output: str
    channel: int | None = None
    options: TranscribeOptions = msgspec.field(default_factory=TranscribeOptions)
    attempt: int = 1


TaskEventKind = Literal["started", "completed", "failed"]


class TaskEvent(Contract, kw_only=True):
    """Published on `events.task.<job_id>` by the engine that runs a task."""

    task_id: str
    job_id: str
    kind: TaskEventKind
    engine: str
    outputs: list[str] = []
    # Facts the orchestrator needs to build the rest of the DAG (channels, duration, language).
    channels: int | None = None
    duration: float | None = None
    language: str | None = None
    failure: Failure | None = None
    attempt: int = 1
    at: float = 0.0


class DeadLetter(Contract, kw_only=True):
    """A message nobody could process, kept with the reason (stream DEADLETTER)."""

    subject: str
    reason: str
    payload: bytes
    at: float = 0.0


# --- artifacts (object store) ------------------------------------------------------------------


class Word(Contract, kw_only=True):
    start: float
    end: float
    word: str
    probability: float = 1.0


class Segment(Contract, kw_only=True):
    id: int = 0
    start: float
    end: float
    text: str
    words: list[Word] = []
    channel: int | None = None
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    temperature: float | None = None
    compression_ratio: float | None = None
    tokens: list[int] = []


class ChannelTranscript(Contract, kw_only=True):
    """A transcribe task's output: one channel's speech."""

    channel: int = 0
    language: str | None = None
    language_probability: float | None = None
    duration: float = 0.0
    segments: list[Segment] = []
    model: str = ""
    engine: str = ""


class Transcript(Contract, kw_only=True):
    """A job's final result, written by the merge stage."""

    job_id: str
    text: str
    language: str | None = None
    duration: float = 0.0
    channels: int = 1
    model: str = ""
    segments: list[Segment] = []


# --- engines ---------------------------------------------------------------------------------

EngineStatus = Literal["starting", "idle", "busy", "loading", "downloading", "error", "stopping"]


class LoadedModel(Contract, kw_only=True):
    model: str
    runtime_model_id: str
    loaded_at: float
    last_used: float
    pinned: bool = False


class Unload(Contract, kw_only=True):
    """What the engine's last unload handed back (memory read before and after)."""

    model: str
    at: float
    rss_before: int
    rss_after: int
    vram_before: int | None = None
    vram_after: int | None = None


class Heartbeat(Contract, kw_only=True):
    """Published on `heartbeat.<runtime>.<engine>` every few seconds, with a TTL of three beats."""

    runtime: str
    engine: str
    host: str
    status: EngineStatus
    version: str
    device: str = "cpu"
    loaded_models: list[LoadedModel] = []
    models_on_disk: list[str] = []
    current_task: str | None = None
    # The runtime model id that task needs: peers count this engine as its holder while it
    # loads it, so two idle engines do not both load the same model for one backlog.
    current_model: str | None = None
    tasks_done: int = 0
    tasks_failed: int = 0
    model_loads: int = 0
    swaps: int = 0
    last_unload: Unload | None = None
    rss_bytes: int = 0
    vram_bytes: int | None = None
    error: str | None = None
    interval: float = 2.0
    started_at: float = 0.0
    sent_at: float = 0.0


# --- model pulls -----------------------------------------------------------------------------


class PullRequest(Contract, kw_only=True):
    model: str
    force: bool = False


class PullProgress(Contract, kw_only=True):
    """Published on `models.progress.<model>` while a model is pulled."""

    model: str
    status: Literal["started", "downloading", "verifying", "installed", "failed"]
    source: str = ""
    completed_bytes: int = 0
    total_bytes: int | None = None
    message: str = ""
    at: float = 0.0


SCHEMA_TYPES: tuple[type[Contract], ...] = (
    JobRequest, CancelRequest, JobEvent, JobRecord, Task, TaskEvent, Transcript, Heartbeat,
    DeadLetter, PullRequest, PullProgress,
)


def json_schemas() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(SCHEMA_TYPES)
    return {"$defs": components}


if __name__ == "__main__":
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(json_schemas())).decode() + "\n")
