"""redact runtime: the job's transcript in, the same transcript out with personal data masked
(dalston.redaction's rules; no model)."""

from __future__ import annotations

from dalston.contracts import Task, Transcript, encode
from dalston.redaction import redact
from dalston.sdk import Actor, TaskContext, TaskFailed, TaskResult


class RedactActor(Actor):
    runtime = "redact"

    async def handle(self, task: Task, ctx: TaskContext) -> TaskResult:
        if len(task.inputs) != 1:
            raise TaskFailed("bad_task", "a redact task needs the job's one transcript as input")
        transcript = redact(await ctx.read_struct(task.inputs[0], Transcript))
        name = await ctx.write(task.output, encode(transcript))
        return TaskResult(outputs=[name], duration=transcript.duration, language=transcript.language)
