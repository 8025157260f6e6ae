"""audio-prepare runtime: any audio file in, 16 kHz mono float32 per distinct channel out."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from dalston.audio import InvalidAudio, decode
from dalston.contracts import Task
from dalston.pcm import to_bytes
from dalston.sdk import Actor, TaskContext, TaskFailed, TaskResult


class AudioPrepareActor(Actor):
    runtime = "audio-prepare"

    async def handle(self, task: Task, ctx: TaskContext) -> TaskResult:
        with tempfile.TemporaryDirectory(prefix="dalston-prepare-") as tmp:
            source = Path(tmp) / "upload"
            await ctx.read_to(task.inputs[0], source)
            try:
                prepared = await asyncio.to_thread(decode, source)
            except InvalidAudio as exc:
                raise TaskFailed("invalid_audio", str(exc)) from None
        outputs = [await ctx.write(f"{task.output}/ch{i}.f32", to_bytes(channel))
                   for i, channel in enumerate(prepared.channels)]
        return TaskResult(outputs=outputs, channels=len(outputs), duration=prepared.duration)
