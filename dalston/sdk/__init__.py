"""The actor SDK: what a runtime actor builds on."""

from dalston.sdk.actor import Actor, ModelActor, TaskContext, TaskFailed, TaskResult

__all__ = ["Actor", "ModelActor", "TaskContext", "TaskFailed", "TaskResult"]
