"""pyannote.audio's speaker diarization pipelines (community-1), from their folder in the model
store. Needs the `pyannote` extra; the weights come from the Hugging Face Hub with an HF_TOKEN
whose account accepted the model's conditions."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyannote.audio import Pipeline

from actors.torch_actor import use_torch
from dalston.config import Settings
from dalston.contracts import DiarizeOptions, SpeakerTurn
from dalston.pcm import SAMPLE_RATE
from dalston.sdk import TaskCancelled, TaskFailed
from dalston.speakers import labelled_turns


class PyannoteDiarizer:
    def __init__(self, path: Path, settings: Settings) -> None:
        # A folder holding config.yaml reads its `$model/...` parts from itself: no Hub access.
        pipeline = Pipeline.from_pretrained(path)
        if pipeline is None:
            raise TaskFailed("invalid_model", f"{path.name}: config.yaml does not describe a pyannote pipeline")
        self.pipeline = pipeline.to(torch.device(use_torch(settings)))

    def unload(self) -> None:
        self.pipeline = None

    def diarize(self, audio: np.ndarray, options: DiarizeOptions,
                cancelled: threading.Event) -> tuple[list[str], list[SpeakerTurn]]:
        def stop_if_cancelled(*_: Any, **__: Any) -> None:
            # pyannote calls its hook after every step (segmentation, embeddings, clustering).
            if cancelled.is_set():
                raise TaskCancelled()

        counts = {name: value for name, value in (
            ("num_speakers", options.num_speakers), ("min_speakers", options.min_speakers),
            ("max_speakers", options.max_speakers)) if value is not None}
        output = self.pipeline({"waveform": torch.from_numpy(audio).unsqueeze(0), "sample_rate": SAMPLE_RATE},
                               hook=stop_if_cancelled, **counts)
        # pyannote.audio 4 answers a DiarizeOutput whose exclusive diarization has one speaker at
        # a time (what words are matched against); older pipelines answer the annotation itself.
        annotation = getattr(output, "exclusive_speaker_diarization", output)
        return labelled_turns([(segment.start, segment.end, label)
                               for segment, _, label in annotation.itertracks(yield_label=True)])
