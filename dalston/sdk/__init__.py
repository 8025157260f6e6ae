"""The actor SDK: what a runtime actor builds on."""

from dalston.sdk.actor import Actor, ModelActor, TaskCancelled, TaskContext, TaskFailed, TaskResult

__all__ = ["Actor", "ModelActor", "TaskCancelled", "TaskContext", "TaskFailed", "TaskResult"]
