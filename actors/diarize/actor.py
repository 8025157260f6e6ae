"""diarize runtime: who spoke when in prepared audio, with the GE2E speaker encoder
(Resemblyzer's, on onnxruntime: no torch) and the pipeline around it, or with a pyannote.audio
pipeline (torch). What a model's folder holds says which."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from actors.diarize import known_speakers
from actors.diarize.ge2e import WEIGHTS, Ge2eDiarizer
from dalston.contracts import Diarization, DiarizeOptions, SpeakerTurn, Task, encode
from dalston.pcm import SAMPLE_RATE
from dalston.sdk import ModelActor, TaskContext, TaskFailed, TaskResult
from dalston.sdk.voices import VoiceEmbedder

# What a pyannote pipeline's folder holds (actors.diarize.pyannote_pipeline imports the optional
# pyannote.audio, so it is imported only for such a model).
PYANNOTE_CONFIG = "config.yaml"


class Diarizer(Protocol):
    def diarize(self, audio: np.ndarray, options: DiarizeOptions,
                cancelled: threading.Event) -> tuple[list[str], list[SpeakerTurn]]: ...

    def unload(self) -> None: ...


class DiarizeActor(ModelActor, VoiceEmbedder):
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

    def embed_voice(self, handle: Diarizer, clip: np.ndarray) -> np.ndarray:
        return known_speakers.embed_voice(self._encoder(handle), clip)

    def _name_known(self, handle: Diarizer, audio: np.ndarray, known: list[tuple[str, np.ndarray]],
                    speakers: list[str], turns: list[SpeakerTurn]) -> tuple[list[str], list[SpeakerTurn]]:
        """The speakers whose voices match known ones, named after them."""
        voices = known_speakers.speaker_voices(self._encoder(handle), audio, turns)
        names = known_speakers.match(voices, known)
        return known_speakers.renamed(speakers, turns, names)

    @staticmethod
    def _encoder(handle: Diarizer):
        """The GE2E encoder of a loaded model: known speakers are GE2E embeddings."""
        if not isinstance(handle, Ge2eDiarizer):
            raise TaskFailed("invalid_model", "known speakers need a GE2E diarization model "
                             "(resemblyzer-ge2e); this one is a pyannote pipeline")
        return handle.encoder

    async def run(self, task: Task, ctx: TaskContext, handle: Diarizer) -> TaskResult:
        if not task.inputs:
            raise TaskFailed("bad_task", "a diarize task needs its prepared audio as input")
        # A channel's chunks, end to end: who spoke is a question about the whole recording.
        audio = np.concatenate([await ctx.read_audio(name) for name in task.inputs])
        options = task.options.diarize or DiarizeOptions()
        speakers, turns = await asyncio.to_thread(handle.diarize, audio, options, ctx.cancelled)
        if options.known_speakers and turns:
            # Embeddings of another model are not comparable with this one's: those voices name nobody.
            known = [(k.name, np.array(k.embedding, dtype=np.float32))
                     for k in options.known_speakers if k.model == task.model]
            speakers, turns = await asyncio.to_thread(self._name_known, handle, audio, known, speakers, turns)
        result = Diarization(channel=task.channel or 0, duration=len(audio) / SAMPLE_RATE,
                             speakers=speakers, turns=turns, model=task.model or "")
        name = await ctx.write(task.output, encode(result))
        return TaskResult(outputs=[name], duration=result.duration)
