"""diarize runtime: who spoke when in prepared audio, with the GE2E speaker encoder
(Resemblyzer's, on onnxruntime: no torch) and the pipeline around it, or with a pyannote.audio
pipeline (torch). What a model's folder holds says which."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from actors.diarize.ge2e import WEIGHTS, Ge2eDiarizer
from dalston.contracts import Diarization, DiarizeOptions, SpeakerTurn, Task, encode
from dalston.pcm import SAMPLE_RATE
from dalston.sdk import ModelActor, TaskContext, TaskFailed, TaskResult

# What a pyannote pipeline's folder holds (actors.diarize.pyannote_pipeline imports the optional
# pyannote.audio, so it is imported only for such a model).
PYANNOTE_CONFIG = "config.yaml"


class Diarizer(Protocol):
    def diarize(self, audio: np.ndarray, options: DiarizeOptions,
                cancelled: threading.Event) -> tuple[list[str], list[SpeakerTurn]]: ...

    def unload(self) -> None: ...


class DiarizeActor(ModelActor):
    runtime = "diarize"

    def load(self, runtime_model_id: str, path: Path) -> Diarizer:
        if (path / WEIGHTS).is_file():
            return Ge2eDiarizer(path, self.settings.cpu_threads)
        if (path / PYANNOTE_CONFIG).is_file():
            try:
                from actors.diarize.pyannote_pipeline import PyannoteDiarizer
            except ImportError as exc:
                raise TaskFailed("invalid_model", f"{runtime_model_id} is a pyannote pipeline, and "
                                 f"pyannote.audio is not installed (the `pyannote` extra): {exc}") from None
            return PyannoteDiarizer(path, self.settings)
        raise TaskFailed("invalid_model", f"{runtime_model_id}: its folder holds neither {WEIGHTS} "
                         f"(a GE2E speaker encoder) nor {PYANNOTE_CONFIG} (a pyannote pipeline)")

    def unload(self, handle: Diarizer) -> None:
        handle.unload()

    async def run(self, task: Task, ctx: TaskContext, handle: Diarizer) -> TaskResult:
        if not task.inputs:
            raise TaskFailed("bad_task", "a diarize task needs its prepared audio as input")
        # A channel's chunks, end to end: who spoke is a question about the whole recording.
        audio = np.concatenate([await ctx.read_audio(name) for name in task.inputs])
        options = task.options.diarize or DiarizeOptions()
        speakers, turns = await asyncio.to_thread(handle.diarize, audio, options, ctx.cancelled)
        result = Diarization(channel=task.channel or 0, duration=len(audio) / SAMPLE_RATE,
                             speakers=speakers, turns=turns, model=task.model or "")
        name = await ctx.write(task.output, encode(result))
        return TaskResult(outputs=[name], duration=result.duration)
