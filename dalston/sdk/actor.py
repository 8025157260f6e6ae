"""What a runtime actor is: the code that runs one kind of task.

An `Actor` handles a task; a `ModelActor` is an actor whose runtime serves models, and only
says how to load, unload and run one. Everything else (the task loop, acks, heartbeats, swaps,
the store) lives in `Engine`, once.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

import msgspec
import numpy as np

from dalston.bus.buckets import ObjectUnreadable
from dalston.contracts import (
    TRANSCRIPT_SUBJECT,
    ChannelTranscript,
    FailureCode,
    Segment,
    Task,
    TranscribeOptions,
    TranscriptDelta,
    encode,
    now,
)
from dalston.pcm import SampleBuffer
from dalston.sdk.announcer import SegmentAnnouncer, SegmentSink
from dalston.sdk.objects import ObjectRefused, TaskClosed, TaskObjects
from dalston.sentences import Sentences, sentences
from dalston.transcript import on_recording_clock, segment_on_recording_clock

if TYPE_CHECKING:
    from dalston.bus.connection import Bus
    from dalston.config import Settings


class TaskCancelled(Exception):
    """The task's job was cancelled while the task ran."""


class TaskFailed(Exception):
    """A task that cannot succeed as asked; `code` and message reach the user."""

    def __init__(self, code: FailureCode, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass
class TaskResult:
    outputs: list[str] = field(default_factory=list)
    channels: int | None = None
    chunks: list[float] | None = None
    duration: float | None = None
    language: str | None = None


@contextmanager
def _objects() -> Iterator[None]:
    """An input that cannot be read fails its task at once: it will not come back. A task no
    longer to run (its job cancelled) stops as cancelled."""
    try:
        yield
    except ObjectUnreadable as exc:
        raise TaskFailed("input_gone", str(exc)) from None
    except TaskClosed:
        raise TaskCancelled() from None
    except ObjectRefused as exc:
        raise TaskFailed("internal", str(exc), retryable=True) from None


@dataclass
class TaskContext:
    """What a task's handler gets beside the task: its objects (its inputs and outputs, through
    the helpers below: `objects` asks the orchestrator, presenting the task's grant), the bus
    (subjects to announce on), the engine's settings, and the job's cancellation."""

    bus: Bus
    settings: Settings
    objects: TaskObjects
    # Set when the job is cancelled; long work checks it between steps.
    cancelled: threading.Event = field(default_factory=threading.Event)

    async def read(self, name: str) -> bytes:
        buffer = io.BytesIO()
        with _objects():
            await self.objects.read_into(name, buffer)
        return buffer.getvalue()

    async def read_to(self, name: str, path: Path) -> None:
        with _objects(), path.open("wb") as file:
            await self.objects.read_into(name, file)

    async def read_audio(self, name: str) -> np.ndarray:
        """Prepared audio (`dalston.pcm`), copied chunk by chunk into its one array."""
        buffers: list[SampleBuffer] = []
        with _objects():
            async for chunks in self.objects.pages(name, lambda size: buffers.append(SampleBuffer(size))):
                for chunk in chunks:
                    buffers[0].write(chunk)
        return buffers[0].samples()

    async def read_struct(self, name: str, kind: type) -> Any:
        return msgspec.json.decode(await self.read(name), type=kind)

    async def write(self, name: str, data: bytes | IO[bytes]) -> str:
        """Store `data` (bytes, or a file streamed in chunks) as `name`."""
        with _objects():
            return await self.objects.write(name, data)

    async def write_file(self, name: str, path: Path) -> str:
        """Store the file at `path`, streamed in chunks rather than read whole."""
        with path.open("rb") as file:
            return await self.write(name, file)


class Actor:
    """Runs tasks of one runtime. Subclasses implement `handle`."""

    runtime: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def device(self) -> str:
        return "cpu"

    async def run(self, task: Task, ctx: TaskContext, model: Any) -> TaskResult:
        """What the engine calls, with the handle of the model the task leased (None here:
        this runtime serves no model)."""
        return await self.handle(task, ctx)

    async def handle(self, task: Task, ctx: TaskContext) -> TaskResult:
        raise NotImplementedError


class ModelActor(Actor):
    """A runtime that serves models: `load` and `unload` them (the engine's model manager leases
    them to tasks and live sessions). Its `run` transcribes with `transcribe`; a runtime whose
    task is not transcription (diarize) gives its own `run`."""

    def load(self, runtime_model_id: str, path: Path) -> Any:
        """Load the model stored at `path`; return a handle (blocking, runs in a thread)."""
        raise NotImplementedError

    def unload(self, handle: Any) -> None:
        """Drop what `load` built; the engine collects memory afterwards."""

    def transcribe(self, handle: Any, audio: np.ndarray, options: TranscribeOptions,
                   cancelled: threading.Event, emit: SegmentSink) -> ChannelTranscript:
        """Transcribe 16 kHz mono float32 audio (blocking, runs in a thread); stop with
        `TaskCancelled` soon after `cancelled` is set. Hand `emit` each segment as soon as it
        is decoded, in order, times relative to `audio`: live listeners see it at once."""
        raise NotImplementedError

    async def run(self, task: Task, ctx: TaskContext, handle: Any) -> TaskResult:
        if not task.inputs:
            raise TaskFailed("bad_task", "a transcribe task needs its prepared audio as input")

        def delta(seq: int, segment: Segment) -> TranscriptDelta:
            return TranscriptDelta(job_id=task.job_id, task_id=task.id, channel=task.channel, seq=seq,
                                   segment=segment, at=now(), grant=task.grant)

        announce = SegmentAnnouncer(ctx.bus, TRANSCRIPT_SUBJECT.format(job_id=task.job_id), delta)
        # One piece of audio (a chunk, or a short recording), or a channel's chunks in order (a
        # streamed job, whose text must come in order): each on the recording's clock.
        starts = task.starts or [task.offset]
        ends = [*starts[1:], task.end]
        # Segments are sentences made of the words' times (dalston.sentences): the runtime is
        # always asked for words, which are kept where the request wants them.
        keep_words = task.options.word_timestamps or task.options.logprobs
        options = msgspec.structs.replace(task.options, word_timestamps=True)
        parts = []
        try:
            for name, start, end in zip(task.inputs, starts, ends):
                audio = await ctx.read_audio(name)
                builder = Sentences(self.settings.segment_pause, self.settings.max_segment_seconds, keep_words)

                def emit(segment: Segment, start: float = start, end: float | None = end,
                         builder: Sentences = builder) -> None:
                    for sentence in builder.add(segment):
                        announce(segment_on_recording_clock(sentence, start, end))

                part = await asyncio.to_thread(self.transcribe, handle, audio, options, ctx.cancelled, emit)
                for sentence in builder.close():
                    announce(segment_on_recording_clock(sentence, start, end))
                part = msgspec.structs.replace(part, segments=sentences(
                    part.segments, self.settings.segment_pause, self.settings.max_segment_seconds, keep_words))
                parts.append(on_recording_clock(part, start, end))
                # The language the first piece heard, for the rest; the prompt leads only.
                options = msgspec.structs.replace(options, prompt=None,
                                                  language=options.language or part.language)
        finally:
            await announce.close()
        result = msgspec.structs.replace(
            parts[0], segments=[s for part in parts for s in part.segments], duration=parts[-1].duration,
            channel=task.channel or 0, model=task.model or "")
        name = await ctx.write(task.output, encode(result))
        return TaskResult(outputs=[name], duration=result.duration, language=result.language)
