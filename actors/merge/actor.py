"""merge runtime: per-channel results (and who spoke, where diarized) in, one transcript out."""

from __future__ import annotations

from dalston.contracts import ChannelTranscript, Diarization, Task, encode
from dalston.sdk import Actor, TaskContext, TaskResult
from dalston.transcript import merge


class MergeActor(Actor):
    runtime = "merge"

    async def handle(self, task: Task, ctx: TaskContext) -> TaskResult:
        parts = [await ctx.read_struct(name, ChannelTranscript) for name in task.inputs]
        diarizations = [await ctx.read_struct(name, Diarization) for name in task.speakers]
        transcript = merge(task.job_id, task.model or "", parts, diarizations)
        name = await ctx.write(task.output, encode(transcript))
        return TaskResult(outputs=[name], duration=transcript.duration, language=transcript.language)
