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
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec

# --- subjects, streams, buckets ------------------------------------------------------------

SUBMIT_SUBJECT = "jobs.submit"
CANCEL_SUBJECT = "jobs.cancel"
TASK_EVENT_SUBJECT = "events.task.{job_id}"
JOB_EVENT_SUBJECT = "events.job.{job_id}"
TASK_SUBJECT = "tasks.{runtime}.{model}"
# Core NATS, empty: a task was queued on its task subject (the engines' doorbell; the task
# itself, with its grant, reaches only the engine that takes it from its queue).
TASK_RING_SUBJECT = "ring." + TASK_SUBJECT
# Both name the NATS identity of their publisher (its user: `nats_identity`), the only one
# allowed to publish there (dalston/bus/permissions.py): no engine beats or dead-letters as another.
HEARTBEAT_SUBJECT = "heartbeat.{runtime}.{identity}.{engine}"
DEADLETTER_SUBJECT = "deadletter.{source}.{identity}"
PULL_SUBJECT = "models.pull.{model}"
PULL_PROGRESS_SUBJECT = "models.progress.{model}"
# Live-only (core NATS, in no stream): segments as engines decode them.
TRANSCRIPT_SUBJECT = "transcript.{job_id}"
# Live sessions (core NATS, in no stream): a claim is a request on a runtime's and model's
# subject that one engine with a free session slot answers; then the session's audio and
# control go in on one subject and its events come out on another.
SESSION_CLAIM_SUBJECT = "sessions.{runtime}.{model}"
# Its subjects name the claiming engine's NATS identity (`SessionClaim.identity`): an engine's
# user may hear and answer only its own sessions (dalston/bus/permissions.py).
SESSION_INPUT_SUBJECT = "session.{identity}.{session_id}.in"
SESSION_OUTPUT_SUBJECT = "session.{identity}.{session_id}.out"
# A voice's embedding (core NATS): a request on a runtime's subject that one of its engines
# answers with the embedding of the clip it carries (`VoiceEmbedRequest`).
VOICE_EMBED_SUBJECT = "voices.embed.{runtime}"
# Engines never touch the object store: a task's inputs and outputs go through the
# orchestrator, asked on this subject with the task's grant (`TaskObjectRequest`).
TASK_OBJECTS_SUBJECT = "objects.task"
# Core NATS, empty: the job was cancelled (what an engine running one of its tasks listens for,
# instead of the job events, which carry webhook URLs).
JOB_CANCELLED_SUBJECT = "cancelled.{job_id}"

JOBS_STREAM = "JOBS"
TASKS_STREAM = "TASKS"
EVENTS_STREAM = "EVENTS"
HEARTBEATS_STREAM = "HEARTBEATS"
DEADLETTER_STREAM = "DEADLETTER"
JOBS_BUCKET = "jobs"
# Enrolled voices (`Voice`), by id; only the gateway reads or writes them.
VOICES_BUCKET = "voices"
# The orchestrators' durable consumers (nats/streams.yaml): while one runs, its long-poll fetch
# waits on the first.
ORCHESTRATOR_JOBS_CONSUMER = "orchestrator-jobs"
ORCHESTRATOR_EVENTS_CONSUMER = "orchestrator-events"
# The webhook service's durable consumer of job events.
WEBHOOKS_CONSUMER = "webhooks"
ARTIFACTS_BUCKET = "artifacts"
# A job's uploaded audio in the artifacts store, where the gateway puts it (and where a job
# published with inline `audio` is stored); a NATS client may name another object.
JOB_AUDIO_OBJECT = "jobs/{job_id}/audio"

# The model token of tasks whose runtime needs no model (audio-prepare, merge).
NO_MODEL = "none"

_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def subject_token(value: str) -> str:
    """`value` as one subject token (and consumer-name part): dots and the like become `_`."""
    return _TOKEN_UNSAFE.sub("_", value) or "_"


def nats_identity(user: str) -> str:
    """What the subjects of a publisher with NATS user `user` name it by (any token where NATS
    has no users)."""
    return subject_token(user or "anonymous")


def heartbeat_subject(runtime: str, identity: str, engine: str) -> str:
    return HEARTBEAT_SUBJECT.format(runtime=subject_token(runtime), identity=subject_token(identity),
                                    engine=subject_token(engine))


def task_subject(runtime: str, runtime_model_id: str | None) -> str:
    return TASK_SUBJECT.format(runtime=subject_token(runtime),
                               model=subject_token(runtime_model_id or NO_MODEL))


def task_ring(runtime: str, runtime_model_id: str | None) -> str:
    return f"ring.{task_subject(runtime, runtime_model_id)}"


def task_consumer_prefix(runtime: str) -> str:
    return f"tasks-{subject_token(runtime)}-"


def task_consumer(runtime: str, runtime_model_id: str | None) -> str:
    """The durable pull consumer that every engine of `runtime` shares for one model."""
    return task_consumer_prefix(runtime) + subject_token(runtime_model_id or NO_MODEL)


# --- identifiers -------------------------------------------------------------------------------
# Every field that becomes part of a subject, a KV key, an object name or a directory keeps to a
# safe alphabet, checked here where every service decodes it: no message can make a service
# publish to a wildcard, read another bucket's key or write outside its job's objects.
# `\Z` rather than `$`, which would let a trailing newline through.

SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
MODEL_ID_PATTERN = rf"^(?!.*\.\.){SAFE_NAME}\Z"
# A runtime's own model id may be `org/name` (a Hub repo); `--` is refused because the store
# spells `/` as `--` on disk and must be able to read it back.
RUNTIME_MODEL_ID_PATTERN = rf"^(?!.*\.\.)(?!.*--){SAFE_NAME}(?:/{SAFE_NAME})?\Z"
_TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,128}\Z"

# Job ids become subject tokens, KV keys and object names.
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}\Z"
JobId = Annotated[str, msgspec.Meta(pattern=JOB_ID_PATTERN)]
# Task ids, runtimes and engine names become subject tokens and message ids.
Token = Annotated[str, msgspec.Meta(pattern=_TOKEN_PATTERN)]
# A task's capability: random hex (dalston.dag), or empty in a message that presents none.
Grant = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{0,64}\Z")]
ModelId = Annotated[str, msgspec.Meta(pattern=MODEL_ID_PATTERN)]
RuntimeModelId = Annotated[str, msgspec.Meta(pattern=RUNTIME_MODEL_ID_PATTERN)]
# What a client may name as the model: an id, an alias such as `whisper-1`, or nothing (default).
ModelName = Annotated[str, msgspec.Meta(pattern=rf"^(?:{MODEL_ID_PATTERN[1:-2]})?\Z")]
# Names in the artifacts object store: path-like, no `..`, not absolute.
ObjectName = Annotated[str, msgspec.Meta(pattern=rf"^(?!.*\.\.){SAFE_NAME}(?:/{SAFE_NAME})*\Z", max_length=512)]
# Free text a user supplied (filenames, reasons): bounded, so no message grows past max_payload.
ShortText = Annotated[str, msgspec.Meta(max_length=1024)]

# A URL the webhook service calls: bounded, http(s) only.
WEBHOOK_URL_PATTERN = r"^https?://[^\s]+\Z"
WEBHOOK_URL_MAX_CHARS = 2048
WebhookUrl = Annotated[str, msgspec.Meta(pattern=WEBHOOK_URL_PATTERN, max_length=WEBHOOK_URL_MAX_CHARS)]

# Whisper reads at most 224 prompt tokens (half its 448-token context); 2048 characters is more
# than that in any language, and keeps a job message small.
MAX_PROMPT_CHARS = 2048


class ContractError(ValueError):
    """A message that does not fit its contract; the text says which field and why."""

    @property
    def field(self) -> str | None:
        """The offending field's path (`options.prompt`), where msgspec named one."""
        found = re.search(r"at `\$\.([^`]+)`", str(self))
        return found.group(1) if found else None


def is_job_id(value: str) -> bool:
    return re.search(JOB_ID_PATTERN, value) is not None


def is_webhook_url(value: str) -> bool:
    return len(value) <= WEBHOOK_URL_MAX_CHARS and re.search(WEBHOOK_URL_PATTERN, value) is not None


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


def convert(value: Any, kind: type[T]) -> T:
    """`value` (a dict built from a form, say) as `kind`, checked as a decoded message is."""
    try:
        return msgspec.convert(value, type=kind)
    except msgspec.ValidationError as exc:
        raise ContractError(f"not a valid {kind.__name__}: {exc}") from None


def now() -> float:
    return time.time()


# --- jobs ------------------------------------------------------------------------------------

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
TaskStatus = Literal["pending", "queued", "running", "completed", "failed", "cancelled"]
Stage = Literal["prepare", "transcribe", "merge", "diarize", "redact"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

# The most speakers a diarization is asked to tell apart.
MAX_SPEAKERS = 32
SpeakerCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_SPEAKERS)]


# Known speakers a request may name (OpenAI's limit), and how long their clips may be.
MAX_KNOWN_SPEAKERS = 4
MIN_VOICE_CLIP_SECONDS = 1.5
MAX_VOICE_CLIP_SECONDS = 10.0
MAX_SPEAKER_NAME_CHARS = 64
# A voice's embedding: GE2E's 256 dimensions, with room for a larger encoder's.
MAX_EMBEDDING_DIMENSIONS = 1024
SpeakerName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SPEAKER_NAME_CHARS,
                                          pattern=r"^[^\x00-\x1f\x7f-\x9f]+\Z")]
Embedding = Annotated[list[float], msgspec.Meta(min_length=1, max_length=MAX_EMBEDDING_DIMENSIONS)]


class KnownSpeaker(Contract, kw_only=True):
    """A voice the diarizer names: the speaker whose turns match `embedding` (unit length, from
    the diarize model `model`) is called `name` rather than SPEAKER_n."""

    name: SpeakerName
    embedding: Embedding
    model: str


class DiarizeOptions(Contract, kw_only=True):
    """Who spoke when: how many speakers to find. Nothing set means the diarizer counts them;
    `num_speakers` fixes the count, `min_speakers` and `max_speakers` bound it. Speakers whose
    voice matches one of `known_speakers` carry its name."""

    num_speakers: SpeakerCount | None = None
    min_speakers: SpeakerCount | None = None
    max_speakers: SpeakerCount | None = None
    known_speakers: Annotated[list[KnownSpeaker], msgspec.Meta(max_length=MAX_KNOWN_SPEAKERS)] = []

    def __post_init__(self) -> None:
        # Raised here, msgspec reports it as a ValidationError of the message that carries it.
        low, high = self.min_speakers or 1, self.max_speakers or MAX_SPEAKERS
        if low > high:
            raise ValueError(f"min_speakers ({low}) is more than max_speakers ({high})")
        if self.num_speakers is not None and not low <= self.num_speakers <= high:
            raise ValueError(f"num_speakers ({self.num_speakers}) is outside min_speakers..max_speakers "
                             f"({low}..{high})")

    @property
    def bounds(self) -> tuple[int, int]:
        """The least and the most speakers the answer may have."""
        if self.num_speakers is not None:
            return self.num_speakers, self.num_speakers
        return self.min_speakers or 1, self.max_speakers or MAX_SPEAKERS


class TranscribeOptions(Contract, kw_only=True):
    """What the user asked of the transcription. Each task carries it, adjusted to its part
    (`dag.task_message`): a later chunk gets the language the first one heard and no prompt,
    and a job with speakers asks for word times."""

    # ISO 639-1 or 639-3, optionally with a region or script (`en`, `yue`, `zh-Hant`).
    language: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})?\Z")] | None = None
    prompt: Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)] | None = None
    # OpenAI's range; NaN and infinities fail it.
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    word_timestamps: bool = False
    # Voice activity detection: on by default, so silence is not hallucinated into words.
    vad: bool = True
    beam_size: Annotated[int, msgspec.Meta(ge=1, le=16)] = 5
    # Whisper's two tasks: speech to text in its language, or into English.
    task: Literal["transcribe", "translate"] = "transcribe"
    # Words the model should expect (faster-whisper's hotwords), bounded as the prompt is.
    hotwords: Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)] | None = None
    # The VAD's own parameters (OpenAI's chunking_strategy server_vad); None: its defaults.
    vad_parameters: VadParameters | None = None
    # Each word's log-probability, where the runtime has them (OpenAI's include[]=logprobs).
    logprobs: bool = False
    # Speaker diarization, where asked for (None: no speakers).
    diarize: DiarizeOptions | None = None
    # The text is streamed as it is decoded: a channel's chunks are then transcribed in order,
    # by one engine, so the text comes in order.
    stream: bool = False
    # Personal data said in the recording (card and phone numbers, e-mail addresses, spoken
    # digit runs) masked as [REDACTED] in the transcript, by the redact stage (None: kept).
    redact: Literal["pii"] | None = None
    # A live turn's interim decode (a partial): at one temperature, without timestamps, as it
    # is decoded again every second or so and has to be cheap.
    draft: bool = False
    # Text the decode continues from: a live turn's words already shown as stable, so the
    # decodes after keep them (whisper_streaming's LocalAgreement).
    prefix: Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)] | None = None


class VadParameters(Contract, kw_only=True):
    """Silero VAD settings, in the names faster-whisper gives them."""

    threshold: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.5
    min_silence_duration_ms: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 2000
    speech_pad_ms: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 400


class JobRequest(Contract, kw_only=True):
    """Published on `jobs.submit` by the gateway or by any NATS client.

    The audio is either inline (`audio`, base64 in JSON; small files) or an object already in
    the `artifacts` object store (`audio_object`). The client picks `id`, so it can subscribe to
    `events.job.<id>` before it publishes.

    `admitted` says that a gateway has already counted the job against DALSTON_MAX_QUEUED_JOBS
    (and answered its client that it is accepted): the orchestrator then takes it whatever its
    own count, so an accepted job is never refused later. Without it the orchestrator applies
    the bound itself and fails a job past it (code `overloaded`). As with `owner`, NATS
    permissions on `jobs.submit` guard who may set it.

    `owner` is the name of the API key the job belongs to: the gateway sets it from the key it
    verified, and only that key (or an admin key) may see, read or cancel the job. A NATS client
    sets it as it likes, so NATS permissions on `jobs.submit` guard who may claim an owner; a job
    without one is visible to admin keys only (or to everyone where the gateway demands no keys).
    """

    id: JobId
    model: ModelName = ""
    audio: bytes | None = None
    audio_object: ObjectName | None = None
    filename: ShortText = ""
    options: TranscribeOptions = msgspec.field(default_factory=TranscribeOptions)
    submitted_at: float = 0.0
    owner: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    # Where the webhook service POSTs the job's end (http or https; the gateway also refuses
    # private addresses, and the webhook service checks again as it delivers).
    webhook_url: WebhookUrl | None = None
    admitted: bool = False


class CancelRequest(Contract, kw_only=True):
    """Published on `jobs.cancel`."""

    id: JobId
    reason: ShortText = "cancelled by user"


# Every reason a job or task fails, with the HTTP status the gateway answers for it: the user's
# fault (4xx) or the service's (5xx).
FAILURE_STATUS: dict[str, int] = {
    "invalid_audio": 400,  # not audio, corrupt, or past a limit (length, channels)
    "no_audio": 400,  # the job names no audio, or audio that is not stored
    "unsupported_language": 400,  # the model does not speak the language asked for
    "unsupported_task": 400,  # the model cannot do what was asked (translate, say)
    "bad_task": 400,  # a task message that cannot be run as it stands
    "wrong_runtime": 400,  # a task published to another runtime's subject
    "unknown_model": 404,
    "cancelled": 409,
    "input_gone": 410,  # an object the task reads is missing or damaged (expired, purged)
    "overloaded": 429,  # DALSTON_MAX_QUEUED_JOBS jobs are unfinished: submit again later
    "internal": 500,  # a bug, or a transient fault that outlived its retries
    "engine_crashed": 500,  # the task kept killing the engines that ran it
    "invalid_model": 503,  # the stored model cannot be loaded (an operator's import)
    "model_unavailable": 503,  # the model could not be pulled
    "no_engine": 503,  # no engine of the runtime is running
}
FailureCode = Literal[tuple(FAILURE_STATUS)]  # type: ignore[valid-type]


class Failure(Contract, kw_only=True):
    """Why something failed, in words a user can act on."""

    code: FailureCode
    message: str
    retryable: bool = False


class TaskRecord(Contract, kw_only=True):
    """One task of a job's DAG, as the orchestrator tracks it."""

    id: str
    stage: Stage
    runtime: str
    channel: int | None = None
    # Which piece of a long recording a transcribe task has (index into JobRecord.chunks).
    chunk: int | None = None
    status: TaskStatus = "pending"
    attempt: int = 0
    # The attempt's capability: only the engine given the task knows it, and its reports and
    # streamed segments must present it (dag.presents_grant).
    grant: str = ""
    engine: str | None = None
    outputs: list[str] = []
    failure: Failure | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None


class ModelRef(Contract, kw_only=True):
    """A model a stage of a job runs on, as the catalog resolved it."""

    model: ModelId
    runtime: Token
    runtime_model_id: RuntimeModelId


class JobRecord(Contract, kw_only=True):
    """A job's state, in the `jobs` key-value bucket (key = job id)."""

    id: str
    status: JobStatus = "queued"
    model: str
    runtime: str
    runtime_model_id: str
    # The models of the stages beyond transcribe (dag.STAGES), by stage: "diarize" where the
    # request asked who spoke. Transcribe's is `model`/`runtime`/`runtime_model_id`.
    models: dict[str, ModelRef] = {}
    # Where records written before `models` kept the diarize model: read into `models`, so a
    # job in flight across an upgrade keeps its speakers. Never written again.
    diarizer: ModelRef | None = None
    options: TranscribeOptions = msgspec.field(default_factory=TranscribeOptions)
    audio_object: str
    filename: str = ""
    tasks: dict[str, TaskRecord] = {}
    channels: int | None = None
    duration: float | None = None
    # Where each piece of a long recording starts (seconds); one piece: [0.0].
    chunks: list[float] = []
    # Transcribe tasks done out of all, for progress displays: one task per chunk of each
    # channel, or one per channel where the text is streamed (its chunks in order).
    chunks_done: int = 0
    chunks_total: int = 0
    language: str | None = None
    transcript_object: str | None = None
    failure: Failure | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None
    owner: str | None = None  # the API key's name, from the JobRequest
    webhook_url: str | None = None  # from the JobRequest
    # The job's trace context (W3C traceparent, tracestate) where traces are on: steps that no
    # message starts (a timeout) join the job's trace with it. {} while traces are off.
    trace: Annotated[dict[str, str], msgspec.Meta(max_length=4)] = {}

    def __post_init__(self) -> None:
        if self.diarizer is not None:
            self.models.setdefault("diarize", self.diarizer)
            self.diarizer = None


class JobEvent(Contract, kw_only=True):
    """Published on `events.job.<id>` whenever a job changes status."""

    job_id: JobId
    status: JobStatus
    transcript_object: str | None = None
    failure: Failure | None = None
    at: float = 0.0
    # The job's webhook, so the webhook service needs no job record to deliver.
    webhook_url: str | None = None


# --- tasks -----------------------------------------------------------------------------------


class Task(Contract, kw_only=True):
    """One unit of work on `tasks.<runtime>.<model>`, for any engine of that runtime."""

    id: Token
    job_id: JobId
    stage: Stage
    runtime: Token
    # The model the engine must hold (None for runtimes without models).
    model: ModelId | None = None
    runtime_model_id: RuntimeModelId | None = None
    inputs: list[ObjectName] = []
    # Object-store name prefix for what the task writes.
    output: ObjectName
    channel: int | None = None
    # A merge task's diarizations (one per channel), whose speakers it lays onto the words.
    speakers: list[ObjectName] = []
    # Where the task's piece of audio starts and ends in the recording (seconds): a transcribe
    # task of a chunk reports times in the recording's, not the chunk's, clock.
    offset: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    # Where each input starts (seconds), for a task given several pieces of one channel.
    starts: Annotated[list[Annotated[float, msgspec.Meta(ge=0.0)]], msgspec.Meta(max_length=10000)] = []
    end: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    options: TranscribeOptions = msgspec.field(default_factory=TranscribeOptions)
    attempt: int = 1
    # What the engine's reports on this task present (TaskRecord.grant).
    grant: Grant = ""


TaskEventKind = Literal["started", "completed", "failed"]


class TaskEvent(Contract, kw_only=True):
    """Published on `events.task.<job_id>` by the engine that runs a task."""

    task_id: Token
    job_id: JobId
    kind: TaskEventKind
    engine: Token
    outputs: list[ObjectName] = []
    # Facts the orchestrator needs to build the rest of the DAG (channels, chunks, duration,
    # language).
    channels: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    chunks: Annotated[list[Annotated[float, msgspec.Meta(ge=0.0)]], msgspec.Meta(max_length=10000)] | None = None
    duration: float | None = None
    language: str | None = None
    failure: Failure | None = None
    attempt: int = 1
    at: float = 0.0
    # The task's grant (Task.grant): a report without it is dead-lettered.
    grant: Grant = ""


class DeadLetter(Contract, kw_only=True):
    """A message nobody could process, kept with the reason (stream DEADLETTER).

    Only the head of the payload is kept (`payload_size` says how much there was), so a dead
    letter always fits in a message whatever was published."""

    subject: str
    reason: str
    payload: bytes
    payload_size: int = 0
    at: float = 0.0


# Enough of a bad message to see what it was; base64 makes it a third larger.
DEAD_LETTER_EXCERPT = 4096


def dead_letter(subject: str, reason: str, payload: bytes) -> DeadLetter:
    return DeadLetter(subject=subject[:256], reason=reason[:2048], payload=payload[:DEAD_LETTER_EXCERPT],
                      payload_size=len(payload), at=now())


# --- artifacts (object store) ------------------------------------------------------------------


class Word(Contract, kw_only=True):
    start: float
    end: float
    word: str
    probability: float = 1.0
    # log(probability), set where the runtime has it and TranscribeOptions.logprobs asked.
    logprob: float | None = None
    speaker: str | None = None


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
    speaker: str | None = None


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
    # How sure the language detection was of `language` (None: not detected, or not reported).
    language_probability: float | None = None


class VoiceEmbedRequest(Contract, kw_only=True):
    """Asked of a diarize engine on VOICE_EMBED_SUBJECT: the embedding of a clip of one voice
    (16-bit PCM at 16 kHz, mono, MIN..MAX_VOICE_CLIP_SECONDS) by the model `model` (its runtime
    model id)."""

    model: str
    pcm16: Annotated[bytes, msgspec.Meta(max_length=int(MAX_VOICE_CLIP_SECONDS * 16000) * 2)]


class VoiceEmbedReply(Contract, kw_only=True):
    """A diarize engine's answer: the clip's unit embedding, or why there is none."""

    embedding: list[float] = []
    error: str | None = None


class Voice(Contract, kw_only=True):
    """An enrolled voice (the `voices` bucket): a name and the embedding of a clip of it, never
    the clip; it belongs to the API key `owner` (None where the gateway demands no keys)."""

    id: str
    name: SpeakerName
    embedding: Embedding
    model: str
    owner: str | None = None
    created_at: float = 0.0


class SpeakerTurn(Contract, kw_only=True):
    """One stretch of time (seconds) in which one speaker talks."""

    start: float
    end: float
    speaker: str


class Diarization(Contract, kw_only=True):
    """A diarize task's output: who spoke when in one channel's audio. Speakers are labelled
    `SPEAKER_0`, `SPEAKER_1`, ... in the order they first speak; turns are in time order and
    do not overlap."""

    channel: int = 0
    duration: float = 0.0
    speakers: list[str] = []
    turns: list[SpeakerTurn] = []
    model: str = ""


class TranscriptDelta(Contract, kw_only=True):
    """Announced on `transcript.<job_id>` by the engine running one of the job's transcribe tasks,
    for each segment as it is decoded. Core NATS, kept nowhere: only who listens while the job
    runs hears it, and the job's transcript (`transcript_object`) stays the result.

    One task's segments come in order, `seq` counting from 0; a task run again (its engine died)
    sends its segments again from 0. The channels of a stereo job interleave."""

    job_id: JobId
    task_id: Token
    channel: int | None = None
    seq: Annotated[int, msgspec.Meta(ge=0)]
    segment: Segment
    at: float = 0.0
    # The task's grant (Task.grant): listeners drop a segment without it.
    grant: Grant = ""


# --- live sessions ------------------------------------------------------------------------

# Live audio is 16-bit little-endian mono PCM, at 24 kHz (OpenAI Realtime's) unless a session
# says otherwise: the rates that the 32 ms frames of server VAD divide into whole samples.
SESSION_SAMPLE_RATE = 24_000
SESSION_SAMPLE_RATES = (8_000, 16_000, 24_000, 48_000)


class TurnDetection(Contract, kw_only=True):
    """Server voice activity detection: a turn starts at speech and ends after a silence."""

    # The speech probability (Silero VAD's, 0 to 1) above which a frame is speech.
    threshold: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.5
    # Audio kept from before the speech started.
    prefix_padding_ms: Annotated[int, msgspec.Meta(ge=0, le=2_000)] = 300
    # Silence that ends a turn (OpenAI documents 200-5000 ms).
    silence_duration_ms: Annotated[int, msgspec.Meta(ge=200, le=5_000)] = 500
    # Speech that starts a turn (shorter is a click or a cough).
    min_speech_ms: Annotated[int, msgspec.Meta(ge=32, le=2_000)] = 96
    # A pause this long ends the speech: the turn is decoded at once, so that the commit
    # `silence_duration_ms` later finds its text ready.
    min_silence_ms: Annotated[int, msgspec.Meta(ge=32, le=5_000)] = 192


class SessionConfig(Contract, kw_only=True):
    """How a live session transcribes: turn detection (None: the client commits turns), and
    its audio's sample rate (fixed once the session is claimed)."""

    options: TranscribeOptions = msgspec.field(default_factory=TranscribeOptions)
    turn_detection: TurnDetection | None = msgspec.field(default_factory=TurnDetection)
    sample_rate: Literal[SESSION_SAMPLE_RATES] = SESSION_SAMPLE_RATE  # type: ignore[valid-type]


class SessionRequest(Contract, kw_only=True):
    """A request on `sessions.<runtime>.<model>`: one engine with a free session slot answers
    with a `SessionClaim` and serves the session until it is closed."""

    id: JobId
    model: ModelId
    runtime: Token
    runtime_model_id: RuntimeModelId
    config: SessionConfig = msgspec.field(default_factory=SessionConfig)
    owner: Annotated[str, msgspec.Meta(max_length=128)] | None = None


class SessionClaim(Contract, kw_only=True):
    """An engine's answer to a `SessionRequest`: taken, or why not."""

    session_id: JobId
    engine: Token
    # The NATS identity the session's subjects name: the engine's user, the only one that may
    # hear its input and speak on its output.
    identity: Token = "engine"
    accepted: bool
    reason: ShortText = ""


SessionInputKind = Literal["audio", "commit", "clear", "configure", "close"]


class SessionInput(Contract, kw_only=True):
    """On `session.<identity>.<id>.in`, from the session's client (the gateway) to its engine."""

    kind: SessionInputKind
    # `audio`: 16-bit little-endian mono PCM at the session's sample rate.
    audio: Annotated[bytes, msgspec.Meta(max_length=4 * 1024 * 1024)] = b""
    config: SessionConfig | None = None  # `configure`


SessionOutputKind = Literal["speech_started", "speech_stopped", "committed", "partial", "completed",
                            "error", "cleared"]


class SessionOutput(Contract, kw_only=True):
    """On `session.<identity>.<id>.out`, from the engine serving the session."""

    kind: SessionOutputKind
    engine: Token
    item_id: str = ""
    audio_ms: int = 0  # speech_started, speech_stopped: where in the session's audio
    text: str = ""  # partial: the turn's text so far (decoded again); completed: the turn's text
    seconds: float = 0.0  # completed: the turn's audio
    # completed, where the session's options ask for word timestamps: on the session's clock.
    words: list[Word] = []
    language: str | None = None  # completed: the language heard
    code: str = ""  # error
    message: str = ""  # error


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
    """Published on `heartbeat.<runtime>.<identity>.<engine>` every few seconds, with a TTL of
    three beats; a beat whose fields do not match its subject is ignored."""

    runtime: Token
    engine: Token
    # Its engine's NATS identity (`nats_identity`).
    identity: Token = "anonymous"
    host: str
    status: EngineStatus
    version: str
    device: str = "cpu"
    loaded_models: list[LoadedModel] = []
    models_on_disk: list[str] = []
    current_task: str | None = None
    # Live sessions it serves, and how many it may.
    sessions: int = 0
    max_sessions: int = 0
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
    model: ModelId
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


# A pull's last statuses: no progress of it follows these.
PULL_ENDED: tuple[str, ...] = ("installed", "failed")


SCHEMA_TYPES: tuple[type[Contract], ...] = (
    JobRequest, CancelRequest, JobEvent, JobRecord, Task, TaskEvent, Transcript, Heartbeat,
    DeadLetter, PullRequest, PullProgress, Diarization, TranscriptDelta, SessionRequest,
    SessionClaim, SessionInput, SessionOutput,
)


Req = TypeVar("Req", bound=Contract)
Rep = TypeVar("Rep", bound=Contract)


@dataclass(frozen=True)
class Endpoint(Generic[Req, Rep]):
    """A request/reply service on NATS (as nats.py's `micro`): the subject its requests come on
    (with `{}` fields), their contract, and its answer's (None: asked, never answered)."""

    subject: str
    request: type[Req]
    reply: type[Rep] | None = None


TaskObjectOp = Literal["open", "read", "write", "seal"]
# An object's chunk (the object store's, dalston.bus.buckets.CHUNK_BYTES), and how many travel
# in one request or reply: 2 MB, well under NATS's max_payload once base64'd in JSON.
TASK_OBJECT_CHUNK = 128 * 1024
TASK_OBJECT_PAGE = 16


class TaskObjectRequest(Contract, kw_only=True):
    """An engine asks the orchestrator for one of its task's objects, presenting the task's
    grant: whether the task is still to run (`open`), a page of an input (`read`, from
    `cursor`), or an output written chunk by chunk (`write` each, then `seal`)."""

    job_id: JobId
    task_id: Token
    grant: Grant
    op: TaskObjectOp
    name: ObjectName | None = None
    cursor: Annotated[int, msgspec.Meta(ge=0)] = 0
    # write: the next chunks of the upload `upload` (the writer's random id); seal: its size
    # and SHA-256 digest (base64url), as NATS's object stores keep them.
    upload: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16,32}\Z")] | None = None
    chunks: Annotated[list[Annotated[bytes, msgspec.Meta(max_length=TASK_OBJECT_CHUNK)]],
                      msgspec.Meta(max_length=TASK_OBJECT_PAGE)] = []
    size: Annotated[int, msgspec.Meta(ge=0)] = 0
    digest: Annotated[str, msgspec.Meta(max_length=64)] = ""


class TaskObjectReply(Contract, kw_only=True):
    """The answer: `error`, or a page."""

    error: str = ""
    unreadable: bool = False  # the object is missing, or (`gone`) its chunks are gone
    gone: bool = False
    closed: bool = False  # the task is no longer to run: its job ended, or it was given anew
    size: int = 0
    digest: str = ""
    chunks: list[bytes] = []
    # read: where the next page starts, 0 when the object is all read.
    cursor: int = 0


# An engine with a free session slot answers a session request with its claim (sdk/sessions.py).
SESSION_CLAIMS: Endpoint[SessionRequest, SessionClaim] = Endpoint(SESSION_CLAIM_SUBJECT, SessionRequest,
                                                                  SessionClaim)
# One gateway takes each request to pull a model into the store (services/intake/models.py).
MODEL_PULLS: Endpoint[PullRequest, Contract] = Endpoint(PULL_SUBJECT, PullRequest)
# One engine of a runtime answers with the embedding of a voice's clip (sdk/voices.py).
VOICE_EMBEDS: Endpoint[VoiceEmbedRequest, VoiceEmbedReply] = Endpoint(VOICE_EMBED_SUBJECT, VoiceEmbedRequest,
                                                                      VoiceEmbedReply)
# One orchestrator answers for a task's objects (services/task_objects.py).
TASK_OBJECTS: Endpoint[TaskObjectRequest, TaskObjectReply] = Endpoint(TASK_OBJECTS_SUBJECT, TaskObjectRequest,
                                                                      TaskObjectReply)


def json_schemas() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(SCHEMA_TYPES)
    return {"$defs": components}


if __name__ == "__main__":
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(json_schemas())).decode() + "\n")
