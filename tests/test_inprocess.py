"""The services in one process on the in-memory bus: the bus itself, the redelivery policy,
admission, and a job's whole life (submit -> prepare -> chunks -> diarize -> merge -> redact ->
events) with the real orchestrator, engines, audio-prepare, merge and redact actors. No nats-server; seconds.

The transcriber and diarizer here are stand-ins that say what they were given (their runtimes
are tested with real weights elsewhere): what is under test is the pipeline around them."""

from __future__ import annotations

import asyncio
import inspect
import io
import math
import struct
import wave
from contextlib import asynccontextmanager

from actors.audio_prepare.actor import AudioPrepareActor
from actors.merge.actor import MergeActor
from actors.redact.actor import RedactActor
from dalston.bus import BusLike
from dalston.bus.connection import Bus
from dalston.bus.consumers import consume
from dalston.bus.delivery import Delivery, RedeliveryPolicy, constant
from dalston.bus.memory import MemoryBus, matches
from dalston.config import Settings, load_settings
from dalston.contracts import (
    CANCEL_SUBJECT,
    JOB_EVENT_SUBJECT,
    JOBS_STREAM,
    ORCHESTRATOR_JOBS_CONSUMER,
    SUBMIT_SUBJECT,
    TASK_EVENT_SUBJECT,
    CancelRequest,
    ChannelTranscript,
    DeadLetter,
    Diarization,
    DiarizeOptions,
    JobEvent,
    JobRequest,
    Segment,
    SpeakerTurn,
    Task,
    TaskEvent,
    TranscribeOptions,
    Word,
    decode,
    encode,
    task_subject,
)
from dalston.pcm import SAMPLE_RATE
from dalston.sdk import Actor, TaskContext, TaskResult
from dalston.sdk.engine import Engine
from dalston.services.orchestrator import Orchestrator
from dalston.transcript import FORMATS, render


def settings(tmp_path, **env: str) -> Settings:
    return load_settings({"DALSTON_MODELS_DIR": str(tmp_path / "models"), "DALSTON_HEARTBEAT_INTERVAL": "0.2",
                          "DALSTON_TASK_ACK_WAIT": "3", **env})


async def until(condition, timeout: float = 30):
    """`condition()`'s first true value (it may be a coroutine's); TimeoutError past `timeout`."""
    async with asyncio.timeout(timeout):
        while True:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.01)


# --- the bus ----------------------------------------------------------------------------------


def test_both_buses_have_what_the_services_use():
    members = [name for name in dir(BusLike) if not name.startswith("_")]
    for name in members:
        if callable(getattr(BusLike, name, None)):
            wanted = list(inspect.signature(getattr(BusLike, name)).parameters)
            for bus in (Bus, MemoryBus):
                assert list(inspect.signature(getattr(bus, name)).parameters) == wanted, (bus, name)


def test_subjects_match_as_nats_says():
    assert matches("tasks.faster-whisper.*", "tasks.faster-whisper.tiny_en")
    assert not matches("tasks.faster-whisper.*", "tasks.faster-whisper.tiny_en.x")
    assert matches("events.>", "events.job.j1") and not matches("events.>", "events")
    assert not matches("events.task.>", "events.job.j1")


async def test_the_jobs_bucket_compares_and_sets(tmp_path):
    bus = MemoryBus(settings(tmp_path))
    job = JobRequest(id="j1")
    bucket = await bus.bucket("b")
    assert await bucket.create("k", encode(job)) and not await bucket.create("k", b"x")
    value, revision = await bucket.get("k")
    assert await bucket.update("k", b"y", revision)
    assert not await bucket.update("k", b"z", revision)  # someone wrote first
    assert (await bucket.get("k"))[0] == b"y"


async def test_a_failing_handler_gets_each_attempt_then_its_message_is_dead_lettered(tmp_path):
    bus = MemoryBus(settings(tmp_path))
    attempts: list[int] = []

    async def failing(delivery: Delivery[JobRequest]) -> None:
        attempts.append(delivery.attempt)
        raise RuntimeError("down")

    policy = RedeliveryPolicy(attempts=3, delay=constant(0.01))
    loop = asyncio.create_task(consume(bus, JOBS_STREAM, ORCHESTRATOR_JOBS_CONSUMER, failing,
                                       kind=JobRequest, policy=policy))
    try:
        await bus.publish(SUBMIT_SUBJECT, JobRequest(id="j1"))
        await bus.raw(SUBMIT_SUBJECT, b'{"id": 7}')  # breaks its contract: never handled
        await until(lambda: len(bus.dead_letters()) == 2)
    finally:
        loop.cancel()
    assert attempts == [1, 2, 3]
    letters = {decode(letter, DeadLetter).payload: decode(letter, DeadLetter).reason
               for letter in bus.dead_letters()}
    assert "not handled in 3 deliveries" in letters[encode(JobRequest(id="j1"))]
    assert "`$.id`" in letters[b'{"id": 7}']
    (state,) = await bus.consumer_states(JOBS_STREAM, ORCHESTRATOR_JOBS_CONSUMER)
    assert state.pending == state.unacked == 0


# --- services on it --------------------------------------------------------------------------------


class Events:
    """Every job event, as a live subscriber sees them."""

    def __init__(self) -> None:
        self.seen: list[JobEvent] = []
        self._changed = asyncio.Event()

    async def put(self, event: JobEvent) -> None:
        self.seen.append(event)
        self._changed.set()

    async def ended(self, job_id: str, timeout: float = 60) -> JobEvent:
        async with asyncio.timeout(timeout):
            while True:
                for event in self.seen:
                    if event.job_id == job_id and event.status in ("completed", "failed", "cancelled"):
                        return event
                self._changed.clear()
                await self._changed.wait()


@asynccontextmanager
async def running(bus: MemoryBus, *services):
    """The services' run loops on `bus`, stopped at the end."""
    tasks = [asyncio.create_task(service.run(bus)) for service in services]
    try:
        yield
    finally:
        for service in services:
            service.stop()
        await asyncio.wait(tasks, timeout=10)
        for task in tasks:
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is not None:
                raise task.exception()


async def events_of(bus: MemoryBus) -> Events:
    events = Events()
    await bus.subscribe(JOB_EVENT_SUBJECT.format(job_id="*"), events.put, kind=JobEvent)
    return events


async def test_admission_refuses_past_the_bound_and_unknown_models(tmp_path):
    bus = MemoryBus(settings(tmp_path))
    events = await events_of(bus)
    orchestrator = Orchestrator(settings(tmp_path, DALSTON_MAX_QUEUED_JOBS="1", DALSTON_ENGINE_WAIT="600"))
    async with running(bus, orchestrator):
        await bus.publish(SUBMIT_SUBJECT, JobRequest(id="first", audio=b"RIFF"))
        await bus.publish(SUBMIT_SUBJECT, JobRequest(id="second", audio=b"RIFF"))
        await bus.publish(SUBMIT_SUBJECT, JobRequest(id="admitted", audio=b"RIFF", admitted=True))
        await bus.publish(SUBMIT_SUBJECT, JobRequest(id="odd", model="no-such-model", admitted=True,
                                                     audio=b"RIFF"))
        refused = await events.ended("second")
        assert refused.failure.code == "overloaded" and "DALSTON_MAX_QUEUED_JOBS" in refused.failure.message
        assert (await events.ended("odd")).failure.code == "unknown_model"
        for job_id in ("first", "admitted"):  # queued: its prepare task waits for an engine
            record = await bus.jobs.get(job_id)
            assert record.status == "queued" and list(record.tasks) == ["prepare"]
        assert await bus.messages_by_subject("TASKS", "tasks.>") == {"tasks.audio-prepare.none": 2}
        await bus.publish(CANCEL_SUBJECT, CancelRequest(id="first"))
        assert (await events.ended("first")).status == "cancelled"


async def test_a_record_is_committed_before_its_tasks_are_published(tmp_path):
    """With several orchestrators, whichever takes an engine's report must find the task in the
    committed record."""
    bus = MemoryBus(settings(tmp_path))
    order: list[str] = []
    create, update, publish = bus.jobs.create, bus.jobs.update, bus.publish

    async def creating(record):
        order.append(f"create {','.join(sorted(record.tasks))}")
        return await create(record)

    async def committing(record, revision):
        order.append(f"commit {','.join(sorted(record.tasks))}")
        return await update(record, revision)

    async def publishing(subject, message, **options):
        order.append(f"publish {subject}")
        await publish(subject, message, **options)

    bus.jobs.create, bus.jobs.update, bus.publish = creating, committing, publishing
    events = await events_of(bus)
    async with running(bus, Orchestrator(settings(tmp_path, DALSTON_ENGINE_WAIT="600"))):
        await bus.publish(SUBMIT_SUBJECT, JobRequest(id="j1", audio=b"RIFF"))
        async def queued():
            record = await bus.jobs.get("j1")
            return record if record is not None and record.status == "queued" else None
        prepare = (await until(queued)).tasks["prepare"]
        await bus.publish(TASK_EVENT_SUBJECT.format(job_id="j1"), TaskEvent(
            task_id=prepare.id, job_id="j1", kind="completed", engine="e", grant=prepare.grant,
            outputs=["jobs/j1/prepared/ch0/00000.f32"], channels=1, duration=1.0))
        await until(lambda: any(e.status == "running" for e in events.seen))
    tasks = [entry for entry in order if entry.startswith(("create", "commit", "publish tasks."))]
    assert tasks == ["create prepare", "publish tasks.audio-prepare.none",
                     "commit prepare,transcribe-0", "publish tasks.faster-whisper.base"]


async def test_a_submission_whose_tasks_were_not_published_is_redriven_when_it_comes_again(tmp_path):
    """The orchestrator died (here: its publish failed) between committing a job and publishing
    its task: the submission, redelivered, finds the record and publishes the queued task."""
    bus = MemoryBus(settings(tmp_path))
    publish, failures = bus.publish, []

    async def failing_once(subject, message, **options):
        if subject.startswith("tasks.") and not failures:
            failures.append(subject)
            raise ConnectionError("NATS went away")
        await publish(subject, message, **options)

    bus.publish = failing_once
    async with running(bus, Orchestrator(settings(tmp_path, DALSTON_ENGINE_WAIT="600"))):
        await bus.publish(SUBMIT_SUBJECT, JobRequest(id="j1", audio=b"RIFF"))
        await until(lambda: bus.messages_by_subject("TASKS", "tasks.>"))
    assert failures == ["tasks.audio-prepare.none"]
    assert await bus.messages_by_subject("TASKS", "tasks.>") == {"tasks.audio-prepare.none": 1}
    assert (await bus.jobs.get("j1")).tasks["prepare"].status == "queued"


def wav(seconds: float) -> bytes:
    """A mono 16 kHz recording: a tone that pauses every few seconds (quiet places to cut)."""
    frames = bytearray()
    for n in range(int(seconds * SAMPLE_RATE)):
        loud = (n // SAMPLE_RATE) % 4 != 3
        frames += struct.pack("<h", int(8000 * math.sin(2 * math.pi * 220 * n / SAMPLE_RATE)) if loud else 0)
    out = io.BytesIO()
    with wave.open(out, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(SAMPLE_RATE)
        file.writeframes(bytes(frames))
    return out.getvalue()


class SayingTranscriber(Actor):
    """Stands in for a transcription runtime: one segment per piece of audio, a word at each
    whole second of the recording the piece holds, named by that second (`w12`)."""

    runtime = "faster-whisper"

    async def handle(self, task: Task, ctx: TaskContext) -> TaskResult:
        starts = task.starts or [task.offset]
        segments = []
        for name, start in zip(task.inputs, starts):
            seconds = await ctx.bus.artifacts.size(name) / 4 / SAMPLE_RATE
            words = [Word(start=t, end=t + 0.5, word=f" w{t}")
                     for t in range(math.ceil(round(start, 6)), math.ceil(round(start + seconds, 6)))]
            segments.append(Segment(start=start, end=start + seconds, words=words,
                                    text="".join(w.word for w in words)))
        part = ChannelTranscript(channel=task.channel or 0, language="en", segments=segments,
                                 duration=(task.end or starts[-1]) - starts[0], model=task.model or "")
        return TaskResult(outputs=[await ctx.write(task.output, encode(part))], language="en",
                          duration=part.duration)


class HalvingDiarizer(Actor):
    """Stands in for a diarization runtime: the first half of the channel is one speaker, the
    second half another."""

    runtime = "diarize"

    async def handle(self, task: Task, ctx: TaskContext) -> TaskResult:
        seconds = sum([await ctx.bus.artifacts.size(name) for name in task.inputs]) / 4 / SAMPLE_RATE
        half = seconds / 2
        diarization = Diarization(channel=task.channel or 0, duration=seconds, speakers=["SPEAKER_0", "SPEAKER_1"],
                                  turns=[SpeakerTurn(start=0, end=half, speaker="SPEAKER_0"),
                                         SpeakerTurn(start=half, end=seconds, speaker="SPEAKER_1")])
        return TaskResult(outputs=[await ctx.write(task.output, encode(diarization))], duration=seconds)


def engines(tmp_path, *actors: tuple[type[Actor], str], **env: str) -> list[Engine]:
    """An engine of each (actor class, engine id), on settings of `env`."""
    made = []
    for actor_class, name in actors:
        engine_settings = settings(tmp_path, DALSTON_ENGINE_ID=name, **env)
        made.append(Engine(actor_class(engine_settings), engine_settings))
    return made


async def test_a_diarized_job_in_chunks_goes_from_submit_to_its_transcript(tmp_path):
    config = settings(tmp_path, DALSTON_CHUNK_SECONDS="30")
    bus = MemoryBus(config)
    events = await events_of(bus)
    services = [Orchestrator(config), *engines(tmp_path, (AudioPrepareActor, "prepare"), (SayingTranscriber, "fw"),
                                               (HalvingDiarizer, "dz"), (MergeActor, "merge"),
                                               DALSTON_CHUNK_SECONDS="30")]
    async with running(bus, *services):
        await bus.publish(SUBMIT_SUBJECT, JobRequest(
            id="life", audio=wav(70), filename="tone.wav",
            options=TranscribeOptions(diarize=DiarizeOptions())))
        ended = await events.ended("life")
        assert ended.status == "completed", ended.failure
    record = await bus.jobs.get("life")
    assert len(record.chunks) >= 2  # cut in pieces at quiet places
    stages = sorted(task.stage for task in record.tasks.values())
    assert stages == ["diarize", "merge", "prepare"] + ["transcribe"] * len(record.chunks)
    transcript = await bus.artifacts.transcript(record)
    words = [w for segment in transcript.segments for w in segment.words]
    # Every chunk's words, once, in the recording's order, each with its half's speaker.
    assert [w.word.strip() for w in words] == [f"w{t}" for t in range(70)]
    assert {w.speaker for w in words if w.end < 30} == {"SPEAKER_0"}
    assert {w.speaker for w in words if w.start > 40} == {"SPEAKER_1"}
    statuses = [e.status for e in events.seen if e.job_id == "life"]
    assert statuses[-1] == "completed" and "running" in statuses


class DictatingTranscriber(Actor):
    """Stands in for a transcription runtime: says a phone number, a word a second."""

    runtime = "faster-whisper"
    SAID = "call me on five five five one two three four in 2019".split()

    async def handle(self, task: Task, ctx: TaskContext) -> TaskResult:
        words = [Word(start=t, end=t + 0.5, word=f" {w}") for t, w in enumerate(self.SAID)]
        part = ChannelTranscript(channel=task.channel or 0, language="en", duration=len(words), segments=[
            Segment(start=0, end=len(words), words=words, text="".join(w.word for w in words))])
        return TaskResult(outputs=[await ctx.write(task.output, encode(part))], language="en",
                          duration=part.duration)


async def test_a_redacted_job_masks_the_merged_transcript_in_every_format(tmp_path):
    config = settings(tmp_path)
    bus = MemoryBus(config)
    events = await events_of(bus)
    services = [Orchestrator(config), *engines(tmp_path, (AudioPrepareActor, "prepare"), (DictatingTranscriber, "fw"),
                                               (MergeActor, "merge"), (RedactActor, "redact"))]
    async with running(bus, *services):
        await bus.publish(SUBMIT_SUBJECT, JobRequest(id="pii", audio=wav(12), filename="call.wav",
                                                     options=TranscribeOptions(redact="pii")))
        ended = await events.ended("pii")
        assert ended.status == "completed", ended.failure
    record = await bus.jobs.get("pii")
    order = sorted(record.tasks.values(), key=lambda t: t.finished_at)
    assert [t.stage for t in order] == ["prepare", "transcribe", "merge", "redact"]
    assert record.transcript_object == record.tasks["redact"].outputs[0]
    transcript = await bus.artifacts.transcript(record)
    assert transcript.text.strip() == "call me on [REDACTED] in 2019"
    words = transcript.segments[0].words
    assert [w.word.strip() for w in words] == ["call", "me", "on", *["[REDACTED]"] * 7, "in", "2019"]
    assert [w.start for w in words] == list(range(12))  # the times stay
    for fmt in FORMATS:
        body, _ = render(transcript, fmt, words=True)
        body = body.decode() if isinstance(body, bytes) else body
        assert "[REDACTED]" in body and "five" not in body, fmt


async def test_a_task_that_keeps_killing_engines_is_failed_by_the_policy(tmp_path):
    """A task whose engines died on it comes back unsettled; past DALSTON_TASK_MAX_DELIVER the
    engine fails it with `engine_crashed` instead of running it again."""
    config = settings(tmp_path, DALSTON_TASK_MAX_DELIVER="2", DALSTON_ENGINE_ID="merge")
    bus = MemoryBus(config)
    reports: list[TaskEvent] = []

    async def report(event: TaskEvent) -> None:
        reports.append(event)

    await bus.subscribe(TASK_EVENT_SUBJECT.format(job_id="*"), report, kind=TaskEvent)
    durable = await bus.task_consumers.ensure("merge", None)
    await bus.publish(task_subject("merge", None), Task(id="j-merge-1", job_id="j", stage="merge",
                                                        runtime="merge", output="jobs/j/transcript.json"))
    queue = await bus.pull(durable, "TASKS")
    for _ in range(2):  # two engines took it and died
        (taken,) = await queue.fetch(1, timeout=1)
        await taken.nak()
    async with running(bus, Engine(MergeActor(config), config)):
        await until(lambda: reports)
    assert [(r.kind, r.failure.code) for r in reports] == [("failed", "engine_crashed")]
    assert "2 times" in reports[0].failure.message
    (state,) = await bus.consumer_states("TASKS", durable)
    assert state.pending == state.unacked == 0
