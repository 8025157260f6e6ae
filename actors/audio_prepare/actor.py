"""audio-prepare runtime: any audio file in, 16 kHz mono float32 per distinct channel out, cut
into chunks where the recording is long (DALSTON_CHUNK_SECONDS)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from dalston.audio import InvalidAudio, decode
from dalston.chunking import ByteRange, chunk_starts
from dalston.contracts import Task
from dalston.pcm import DTYPE, SAMPLE_RATE
from dalston.sdk import Actor, TaskContext, TaskFailed, TaskResult


class AudioPrepareActor(Actor):
    runtime = "audio-prepare"

    async def handle(self, task: Task, ctx: TaskContext) -> TaskResult:
        # Upload and decoded channels live on disk, never whole in memory.
        with tempfile.TemporaryDirectory(prefix="dalston-prepare-") as tmp:
            source = Path(tmp) / "upload"
            await ctx.read_to(task.inputs[0], source)
            try:
                prepared = await asyncio.to_thread(
                    decode, source, Path(tmp), max_duration=self.settings.max_audio_seconds,
                    max_channels=self.settings.max_channels)
            except InvalidAudio as exc:
                raise TaskFailed("invalid_audio", str(exc)) from None
            source.unlink()  # its disk space back before the channels are stored
            samples = round(prepared.duration * SAMPLE_RATE)
            starts = chunk_starts(prepared.channels, samples, self.settings.chunk_seconds)
            # Channel by channel, chunk by chunk: what the DAG expects of the outputs' order.
            outputs = []
            for c, channel in enumerate(prepared.channels):
                for k, (start, end) in enumerate(zip(starts, [*starts[1:], samples])):
                    with ByteRange(channel, start * DTYPE.itemsize, (end - start) * DTYPE.itemsize) as piece:
                        outputs.append(await ctx.write(f"{task.output}/ch{c}/{k:05d}.f32", piece))
        return TaskResult(outputs=outputs, channels=len(prepared.channels), duration=prepared.duration,
                          chunks=[start / SAMPLE_RATE for start in starts])
