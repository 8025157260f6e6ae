"""audio-prepare runtime: any audio file in, 16 kHz mono float32 per distinct channel out."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from dalston.audio import InvalidAudio, decode
from dalston.contracts import Task
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
            outputs = [await ctx.write_file(f"{task.output}/ch{i}.f32", channel)
                       for i, channel in enumerate(prepared.channels)]
        return TaskResult(outputs=outputs, channels=len(outputs), duration=prepared.duration)
