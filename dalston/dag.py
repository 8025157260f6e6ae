"""A job's DAG, one table (`STAGES`): prepare -> transcribe (one task per chunk of each distinct
channel), beside diarize (one per channel) where the request asks who spoke -> merge -> redact
where the request asks (`redact=pii`). The job's transcript is the output of the last stage.

A long recording comes out of prepare in chunks (`JobRecord.chunks`): every chunk is a task of
its own, so every engine of the runtime can take one. Where the language is not given, the first
chunk runs alone and the language it hears is given to the rest: one language for the job.

Pure functions over a `JobRecord`: what happens when an event arrives and which tasks are ready.
The orchestrator does the I/O; every decision about a job's progress is made here, so it can be
replayed after a crash with the same result.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import msgspec

from dalston.contracts import (TERMINAL, Failure, JobRecord, ModelRef, Task, TaskEvent, TaskRecord,
                               TranscribeOptions, now)

PREPARE = "prepare"

# What a stage works on, which is also how many tasks it has: one per chunk of each channel,
# one per channel (given all its chunks), or one per job.
Consumes = Literal["job_audio", "chunk_audio", "channel_audio", "channel_transcript", "job_transcript"]
_PER_JOB = ("job_audio", "channel_transcript", "job_transcript")


@dataclass(frozen=True)
class Stage:
    """A row of the job's DAG: a stage runs, when the request wants it, once every wanted stage
    it comes `after` has completed, and is given their outputs as its inputs."""

    name: str
    consumes: Callable[[JobRecord], Consumes]
    after: tuple[str, ...]
    wanted: Callable[[JobRecord], bool]
    runtime: Callable[[JobRecord], str]


def _always(job: JobRecord) -> bool:
    return True


def _runtime_of(stage: str) -> Callable[[JobRecord], str]:
    return lambda job: model_of(job, stage).runtime


STAGES = (
    Stage("prepare", lambda job: "job_audio", (), _always, lambda job: "audio-prepare"),
    # A streamed job's chunks go to one engine in order, so its text streams in order.
    Stage("transcribe", lambda job: "channel_audio" if job.options.stream else "chunk_audio",
          ("prepare",), _always, _runtime_of("transcribe")),
    Stage("diarize", lambda job: "channel_audio", ("prepare",), lambda job: "diarize" in job.models,
          _runtime_of("diarize")),
    Stage("merge", lambda job: "channel_transcript", ("transcribe", "diarize"), _always,
          lambda job: "merge"),
    Stage("redact", lambda job: "job_transcript", ("merge",), lambda job: job.options.redact == "pii",
          lambda job: "redact"),
)
_BY_NAME = {stage.name: stage for stage in STAGES}


def stage_models(options: TranscribeOptions, diarize_model: str) -> dict[str, str]:
    """The public ids of the models the job's stages beyond transcribe run on, from the options
    that ask for them (the caller resolves them in the catalog into `JobRecord.models`)."""
    return {"diarize": diarize_model} if options.diarize is not None else {}


def runtimes(job: JobRecord) -> list[str]:
    """The runtimes the job's stages run on, in order."""
    return [stage.runtime(job) for stage in STAGES if stage.wanted(job)]


def model_of(job: JobRecord, stage: str) -> ModelRef:
    """The model a stage of the job runs on: the one the request named for transcribe (kept in
    the record's own fields, so records written before `models` existed still read)."""
    if stage == "transcribe":
        return ModelRef(model=job.model, runtime=job.runtime, runtime_model_id=job.runtime_model_id)
    return job.models[stage]


def transcribe_key(channel: int, chunk: int, chunks: int) -> str:
    return f"transcribe-{channel}" if chunks == 1 else f"transcribe-{channel}-{chunk}"


def _key(stage: str, consumes: Consumes, channel: int, chunk: int, chunks: int) -> str:
    if consumes in _PER_JOB:
        return stage
    if consumes == "chunk_audio":
        return transcribe_key(channel, chunk, chunks) if stage == "transcribe" else f"{stage}-{channel}-{chunk}"
    return f"{stage}-{channel}"


def task_id(job_id: str, key: str, attempt: int) -> str:
    return f"{job_id}-{key}-{attempt}"


def new_grant() -> str:
    """A task attempt's capability: unguessable, known to the orchestrator (the job record) and
    to the engine the attempt is given to (its Task message)."""
    return secrets.token_hex(16)


def presents_grant(job: JobRecord, task_id: str, grant: str) -> bool:
    """Whether `grant` is the capability of the job's task `task_id` (False for a task the job
    does not list)."""
    task = next((t for t in job.tasks.values() if t.id == task_id), None)
    return task is not None and bool(task.grant) and hmac.compare_digest(task.grant.encode(), grant.encode())


def task_objects(job: JobRecord, task_id: str) -> tuple[list[str], str] | None:
    """What the job's task `task_id` may read (its inputs, and a merge's diarizations) and the
    name it writes (its output, or objects under it: prepare's pieces), while it is still to
    run (queued or running); None otherwise. Everything an engine may touch of the store."""
    key = next((k for k, t in job.tasks.items() if t.id == task_id), None)
    if key is None or job.status in TERMINAL or job.tasks[key].status not in ("queued", "running"):
        return None
    task = task_message(job, key)
    return [*task.inputs, *task.speakers], task.output


def writes(output: str, name: str) -> bool:
    """Whether `name` is a task's `output` or an object under it."""
    return name == output or name.startswith(f"{output}/")


def refusal(job: JobRecord, event: TaskEvent) -> str | None:
    """Why a report on one of the job's tasks must not be applied: it lacks the task's grant,
    or names outputs outside the job's objects (another job's transcript, say). None for a
    report that may be applied, and for one on a task the job does not list (stale or early:
    `apply_event` and `is_early` decide)."""
    if not any(t.id == event.task_id for t in job.tasks.values()):
        return None
    if not presents_grant(job, event.task_id, event.grant):
        return f"the report on task {event.task_id} does not present its grant"
    if any(not name.startswith(f"jobs/{job.id}/") for name in event.outputs):
        return f"the report on task {event.task_id} names outputs outside job {job.id}"
    return None


def _new_task(job: JobRecord, key: str, stage: str, runtime: str, channel: int | None = None,
              chunk: int | None = None) -> None:
    job.tasks[key] = TaskRecord(id=task_id(job.id, key, 1), stage=stage, runtime=runtime,
                                channel=channel, chunk=chunk, attempt=1, grant=new_grant())


def start(job: JobRecord) -> None:
    """The first task of a new job."""
    _new_task(job, PREPARE, PREPARE, _BY_NAME[PREPARE].runtime(job))


def apply_event(job: JobRecord, event: TaskEvent, max_attempts: int) -> bool:
    """Fold one task event into the job; False when it is stale or a duplicate."""
    key = next((k for k, t in job.tasks.items() if t.id == event.task_id), None)
    if key is None or job.status in TERMINAL:
        return False
    task = job.tasks[key]
    if task.status in TERMINAL:
        return False
    if event.kind == "started":
        task.status, task.engine, task.started_at = "running", event.engine, event.at
    elif event.kind == "completed":
        task.status, task.outputs, task.finished_at = "completed", event.outputs, event.at
        task.engine = event.engine
        if key == PREPARE:
            job.channels, job.duration = event.channels, event.duration
            job.chunks = event.chunks or [0.0]
        elif event.language and not job.language:
            job.language = event.language
    else:
        failure = event.failure or Failure(code="internal", message="task failed without a reason")
        if failure.retryable and task.attempt < max_attempts:
            # A fresh attempt under a new id: reports of the old one become stale.
            task.attempt += 1
            task.id = task_id(job.id, key, task.attempt)
            task.grant = new_grant()
            task.status, task.engine, task.started_at = "pending", None, None
            task.failure = failure
        else:
            task.status, task.failure, task.finished_at = "failed", failure, event.at
    return True


def advance(job: JobRecord) -> list[str]:
    """Grow the DAG as inputs appear, settle the job's status, and return the keys of tasks
    that are ready to publish (marked queued)."""
    if job.status in TERMINAL:
        return []
    failed = next((t for t in job.tasks.values() if t.status == "failed"), None)
    if failed is not None:
        finish(job, "failed", failed.failure)
        return []
    for stage in STAGES:
        if stage.wanted(job) and not _has(job, stage.name) and all(_done(job, name) for name in stage.after):
            _grow(job, stage)
    transcribes = [t for t in job.tasks.values() if t.stage == "transcribe"]
    job.chunks_total = len(transcribes)
    job.chunks_done = sum(t.status == "completed" for t in transcribes)
    wanted = [stage for stage in STAGES if stage.wanted(job)]
    if all(_done(job, stage.name) for stage in wanted):
        last = next(t for t in job.tasks.values() if t.stage == wanted[-1].name)
        job.transcript_object = last.outputs[0] if last.outputs else None
        finish(job, "completed")
        return []
    ready = pending(job)
    stamp = now()
    for key in ready:
        job.tasks[key].status = "queued"
        job.tasks[key].queued_at = stamp
    if any(t.status in ("running", "completed") for t in job.tasks.values()):
        job.status = "running"
    return ready


def _has(job: JobRecord, stage: str) -> bool:
    return any(t.stage == stage for t in job.tasks.values())


def _done(job: JobRecord, stage: str) -> bool:
    """Whether `stage` has nothing left to give: completed, or not wanted by this job."""
    if not _BY_NAME[stage].wanted(job):
        return True
    tasks = [t for t in job.tasks.values() if t.stage == stage]
    return bool(tasks) and all(t.status == "completed" for t in tasks)


def _grow(job: JobRecord, stage: Stage) -> None:
    consumes, chunks = stage.consumes(job), len(job.chunks) or 1
    channels = 1 if consumes in _PER_JOB else job.channels or 1
    for channel in range(channels):
        for chunk in range(chunks if consumes == "chunk_audio" else 1):
            _new_task(job, _key(stage.name, consumes, channel, chunk, chunks), stage.name, stage.runtime(job),
                      None if consumes in _PER_JOB else channel, chunk if consumes == "chunk_audio" else None)


def pending(job: JobRecord) -> list[str]:
    """The keys of tasks that `advance` will queue: all that wait, but the chunks that wait for
    the language the first chunk hears."""
    return [k for k, t in job.tasks.items() if t.status == "pending" and not _awaits_language(job, t)]


def _awaits_language(job: JobRecord, task: TaskRecord) -> bool:
    if (task.stage != "transcribe" or task.chunk is None or len(job.chunks) < 2
            or job.options.language or job.language):
        return False
    first = job.tasks[transcribe_key(0, 0, len(job.chunks))]
    return task is not first and first.status != "completed"


def queued(job: JobRecord) -> list[str]:
    """The keys of tasks published (or about to be) that no engine has reported on."""
    return [k for k, t in job.tasks.items() if t.status == "queued"]


def is_early(job: JobRecord, event: TaskEvent) -> bool:
    """Whether `event` is about a task the job does not list yet: a later attempt, or a stage
    not grown yet. (An earlier attempt's report is stale, not early.)"""
    if job.status in TERMINAL:
        return False
    for key, task in job.tasks.items():
        prefix = f"{job.id}-{key}-"
        if event.task_id.startswith(prefix):
            attempt = event.task_id.removeprefix(prefix)
            return attempt.isdigit() and int(attempt) > task.attempt
    return True


def finish(job: JobRecord, status: str, failure: Failure | None = None) -> None:
    """End the job; tasks still open are cancelled."""
    job.status = status
    job.failure = failure
    job.finished_at = job.updated_at = now()
    for task in job.tasks.values():
        if task.status not in TERMINAL:
            task.status = "cancelled"


def task_message(job: JobRecord, key: str) -> Task:
    """The message that asks an engine to run task `key` of `job`: its inputs are what its
    stage consumes, the outputs of the stages it comes after."""
    record = job.tasks[key]
    stage = _BY_NAME[record.stage]
    consumes = stage.consumes(job)
    base = f"jobs/{job.id}"
    chunks = len(job.chunks) or 1
    options, offset, end, speakers, starts = job.options, 0.0, None, [], []
    if consumes == "job_audio":
        inputs, output = [job.audio_object], f"{base}/prepared"
    elif consumes == "chunk_audio":
        chunk = record.chunk or 0
        inputs = [_outputs(job, PREPARE)[record.channel * chunks + chunk]]
        output = f"{base}/{stage.name}/ch{record.channel}" + (f"-{chunk:05d}" if chunks > 1 else "") + ".json"
        if chunks > 1:
            offset = job.chunks[chunk]
            end = job.chunks[chunk + 1] if chunk + 1 < chunks else job.duration
            # The language the first chunk heard, for all; the prompt leads the recording only.
            options = msgspec.structs.replace(
                options, language=options.language or job.language,
                prompt=options.prompt if chunk == 0 else None)
    elif consumes == "channel_audio":  # a channel's chunks, in order, each on the recording's clock
        inputs = _outputs(job, PREPARE)[record.channel * chunks:(record.channel + 1) * chunks]
        output = f"{base}/{stage.name}/ch{record.channel}.json"
        if chunks > 1:
            starts, end = job.chunks, job.duration
    elif consumes == "channel_transcript":  # merged into the job's transcript, speakers laid on
        inputs, output = _outputs(job, stage.after[0]), f"{base}/transcript.json"
        speakers = _outputs(job, "diarize") if "diarize" in stage.after else []
    else:  # the job's transcript, rewritten
        inputs = [o for name in stage.after for o in _outputs(job, name)]
        output = f"{base}/transcript-{stage.name}.json"
    if record.stage == "transcribe" and "diarize" in job.models:  # speakers are laid onto words
        options = msgspec.structs.replace(options, word_timestamps=True)
    model = runtime_model_id = None
    if record.stage == "transcribe" or record.stage in job.models:
        ref = model_of(job, record.stage)
        model, runtime_model_id = ref.model, ref.runtime_model_id
    elif consumes in ("channel_transcript", "job_transcript"):  # the transcript names the job's model
        model = job.model
    return Task(
        id=record.id, job_id=job.id, stage=record.stage, runtime=record.runtime, model=model,
        runtime_model_id=runtime_model_id, inputs=inputs, output=output, channel=record.channel,
        options=options, speakers=speakers, offset=offset, starts=starts, end=end, attempt=record.attempt,
        grant=record.grant)


def _outputs(job: JobRecord, stage: str) -> list[str]:
    """The outputs of a stage's tasks, in (channel, chunk) order."""
    parts = sorted((t for t in job.tasks.values() if t.stage == stage), key=lambda t: (t.channel or 0, t.chunk or 0))
    return [name for t in parts for name in t.outputs]
