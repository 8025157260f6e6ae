"""NeMo runtime (Parakeet TDT, CTC and RNNT): load a `.nemo` archive, unload, transcribe."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nemo.collections.asr.models import ASRModel
from nemo.utils import logging as nemo_logging

from actors.torch_actor import TorchActor
from dalston.catalog import Catalog, CatalogError
from dalston.chunking import quietest
from dalston.config import Settings
from dalston.contracts import ChannelTranscript, Segment, TranscribeOptions, Word
from dalston.pcm import SAMPLE_RATE
from dalston.sdk import TaskCancelled, TaskFailed
from dalston.sdk.announcer import SegmentSink

# Audio goes to the model in windows of the runtime's `chunk_seconds` (its catalog entry), so
# memory stays bounded on long files and a cancelled job stops within one window.
# Each window ends at the quietest moment of its last seconds, found as the chunker finds its
# cuts (`dalston.chunking.quietest`), so few words are cut in two; a remainder shorter than
# this joins the window before it.
CUT_SEARCH_SECONDS = 5
# Shorter than this is no speech, and too short for the model's STFT.
MIN_SAMPLES = SAMPLE_RATE // 10

# NeMo logs every transcribe call at INFO; the engine's own log says what matters.
nemo_logging.setLevel(logging.WARNING)


class NemoActor(TorchActor):
    runtime = "nemo"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.chunk_seconds = Catalog.from_settings(settings).runtime(self.runtime).chunk_seconds
        if self.chunk_seconds is None or self.chunk_seconds <= CUT_SEARCH_SECONDS:
            raise CatalogError(f"runtime {self.runtime!r}: chunk_seconds must be set, and more than the "
                               f"{CUT_SEARCH_SECONDS} s searched for a quiet cut")

    def load(self, runtime_model_id: str, path: Path) -> ASRModel:
        try:
            model = ASRModel.restore_from(str(path / "model.nemo"), map_location=torch.device(self.device))
        except (MemoryError, torch.OutOfMemoryError):
            raise  # not the archive's fault: the engine reports it as retryable
        except Exception as exc:  # noqa: BLE001 - tar, pickle, config and hydra errors alike
            raise TaskFailed("invalid_model", f"{runtime_model_id}: model.nemo is not a loadable NeMo "
                             f"archive ({type(exc).__name__}: {exc})") from None
        # Only speech-to-text models decode to text; a speaker or classification model restores
        # just as well.
        if not isinstance(model, ASRModel) or not hasattr(model, "decoding"):
            kind = type(model).__name__
            self.unload(model)
            raise TaskFailed("invalid_model",
                             f"{runtime_model_id}: model.nemo holds {kind}, not a speech recognition model")
        return model.eval()

    def unload(self, handle: ASRModel) -> None:
        # Onto the meta device: the weights' memory (host or GPU) is freed now, even if a stray
        # reference to the module (a traceback, a NeMo cache) outlives it.
        handle.to("meta")

    def transcribe(self, handle: ASRModel, audio: np.ndarray, options: TranscribeOptions,
                   cancelled: threading.Event, emit: SegmentSink) -> ChannelTranscript:
        duration = len(audio) / SAMPLE_RATE
        segments: list[Segment] = []
        for start, window in _windows(audio, self.chunk_seconds):
            if cancelled.is_set():
                raise TaskCancelled()
            hypothesis = handle.transcribe([window], batch_size=1, timestamps=True, verbose=False)[0]
            for segment in _segments(hypothesis.timestamp, start / SAMPLE_RATE, duration,
                                     options.word_timestamps):
                segment.id = len(segments)
                segments.append(segment)
                emit(segment)
        return ChannelTranscript(language=options.language, duration=duration, segments=segments)


def _windows(audio: np.ndarray, chunk_seconds: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first sample, samples) of consecutive windows of at most `chunk_seconds`."""
    size, search = chunk_seconds * SAMPLE_RATE, CUT_SEARCH_SECONDS * SAMPLE_RATE
    start = 0
    while start < len(audio):
        end = start + size
        if end + search >= len(audio):
            end = len(audio)
        else:
            end -= search - quietest(np.square(audio[end - search:end], dtype=np.float32))
        if end - start >= MIN_SAMPLES:
            yield start, audio[start:end]
        start = end


def _segments(stamps: dict, offset: float, duration: float, with_words: bool) -> list[Segment]:
    """NeMo's segment and word timestamps (seconds within the window) as wire segments."""

    def at(seconds: Any) -> float:
        # NeMo hands out numpy scalars, and its last frame may overhang the audio.
        return round(min(offset + float(seconds), duration), 3)

    words = iter(stamps.get("word", []))
    segments = []
    for segment in stamps.get("segment", []):
        text = segment["segment"].strip()
        # A segment's text is its words joined by spaces, in order.
        members = list(itertools.islice(words, len(text.split())))
        segments.append(Segment(
            start=at(segment["start"]), end=at(segment["end"]), text=text,
            words=[Word(start=at(w["start"]), end=at(w["end"]), word=w["word"]) for w in members]
            if with_words else []))
    return segments
