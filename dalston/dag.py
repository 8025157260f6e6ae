"""A job's DAG: prepare -> transcribe (one task per chunk of each distinct channel), beside
diarize (one per channel) where the request asks who spoke -> merge.

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

import msgspec

from dalston.contracts import TERMINAL, Failure, JobRecord, Task, TaskEvent, TaskRecord, now

PREPARE = "prepare"
MERGE = "merge"
PREPARE_RUNTIME = "audio-prepare"
MERGE_RUNTIME = "merge"


@dataclass(frozen=True)
class AudioStage:
    """A stage that works on the prepared audio, side by side with the others, when the request
    wants it; merge waits for them all. Another stage that reads only the prepared audio is one
    more of these, its runtime, and a model field on `JobRecord` (as `diarizer`). A stage that
    reads a transcript (alignment, redaction) has not this shape: merge is wired in as the last
    task (`advance`, `task_message`), and nothing runs after it."""

    stage: str
    wanted: Callable[[JobRecord], bool]
    # The model it runs on: (public id, runtime, runtime model id).
    model: Callable[[JobRecord], tuple[str, str, str]]
    # One task per chunk of each channel (else one per channel, given all its chunks).
    per_chunk: Callable[[JobRecord], bool]


AUDIO_STAGES = (
    # A streamed job's chunks go to one engine in order, so its text streams in order.
    AudioStage("transcribe", lambda job: True,
               lambda job: (job.model, job.runtime, job.runtime_model_id),
               per_chunk=lambda job: not job.options.stream),
    AudioStage("diarize", lambda job: job.diarizer is not None,
               lambda job: (job.diarizer.model, job.diarizer.runtime, job.diarizer.runtime_model_id),
               per_chunk=lambda job: False),
)
_STAGES = {stage.stage: stage for stage in AUDIO_STAGES}


def transcribe_key(channel: int, chunk: int, chunks: int) -> str:
    return f"transcribe-{channel}" if chunks == 1 else f"transcribe-{channel}-{chunk}"


def _key(stage: AudioStage, job: JobRecord, channel: int, chunk: int, chunks: int) -> str:
    if stage.per_chunk(job):
        return transcribe_key(channel, chunk, chunks) if stage.stage == "transcribe" else f"{stage.stage}-{channel}-{chunk}"
    return f"{stage.stage}-{channel}"


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
    _new_task(job, PREPARE, "prepare", PREPARE_RUNTIME)


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
    prepare = job.tasks[PREPARE]
    if prepare.status == "completed" and not any(t.stage in _STAGES for t in job.tasks.values()):
        chunks = len(job.chunks) or 1
        for stage in (stage for stage in AUDIO_STAGES if stage.wanted(job)):
            per_chunk = stage.per_chunk(job)
            for channel in range(job.channels or 1):
                for chunk in range(chunks if per_chunk else 1):
                    _new_task(job, _key(stage, job, channel, chunk, chunks), stage.stage,
                              stage.model(job)[1], channel, chunk if per_chunk else None)
    on_audio = [t for t in job.tasks.values() if t.stage in _STAGES]
    transcribes = [t for t in on_audio if t.stage == "transcribe"]
    job.chunks_total = len(transcribes)
    job.chunks_done = sum(t.status == "completed" for t in transcribes)
    if on_audio and all(t.status == "completed" for t in on_audio) and MERGE not in job.tasks:
        _new_task(job, MERGE, "merge", MERGE_RUNTIME)
    merge = job.tasks.get(MERGE)
    if merge is not None and merge.status == "completed":
        job.transcript_object = merge.outputs[0] if merge.outputs else None
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
    """The message that asks an engine to run task `key` of `job`."""
    record = job.tasks[key]
    base = f"jobs/{job.id}"
    chunks = len(job.chunks) or 1
    prepared = job.tasks[PREPARE].outputs
    options, offset, end, speakers, starts = job.options, 0.0, None, [], []
    model = runtime_model_id = None
    if record.stage == "prepare":
        inputs, output = [job.audio_object], f"{base}/prepared"
    elif record.stage == "transcribe" and record.chunk is None and chunks > 1:  # streamed: in order
        inputs = prepared[record.channel * chunks:(record.channel + 1) * chunks]
        output = f"{base}/transcribe/ch{record.channel}.json"
        starts, end = job.chunks, job.duration
    elif record.stage == "transcribe":
        chunk = record.chunk or 0
        inputs = [prepared[record.channel * chunks + chunk]]
        output = f"{base}/transcribe/ch{record.channel}" + (f"-{chunk:05d}" if chunks > 1 else "") + ".json"
        if chunks > 1:
            offset = job.chunks[chunk]
            end = job.chunks[chunk + 1] if chunk + 1 < chunks else job.duration
            # The language the first chunk heard, for all; the prompt leads the recording only.
            options = msgspec.structs.replace(
                options, language=options.language or job.language,
                prompt=options.prompt if chunk == 0 else None)
    elif record.stage in _STAGES:  # a stage given a channel's whole audio (diarize)
        inputs = prepared[record.channel * chunks:(record.channel + 1) * chunks]
        output = f"{base}/{record.stage}/ch{record.channel}.json"
    else:
        def outputs(stage: str) -> list[str]:
            parts = sorted((t for t in job.tasks.values() if t.stage == stage),
                           key=lambda t: (t.channel, t.chunk or 0))
            return [t.outputs[0] for t in parts]
        inputs, speakers, output = outputs("transcribe"), outputs("diarize"), f"{base}/transcript.json"
        model = job.model
    if record.stage == "transcribe" and job.diarizer is not None:  # speakers are laid onto words
        options = msgspec.structs.replace(options, word_timestamps=True)
    if record.stage in _STAGES:
        model, _, runtime_model_id = _STAGES[record.stage].model(job)
    return Task(
        id=record.id, job_id=job.id, stage=record.stage, runtime=record.runtime, model=model,
        runtime_model_id=runtime_model_id, inputs=inputs, output=output, channel=record.channel,
        options=options, speakers=speakers, offset=offset, starts=starts, end=end, attempt=record.attempt,
        grant=record.grant)
