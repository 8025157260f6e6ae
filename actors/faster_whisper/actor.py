"""faster-whisper (CTranslate2) runtime: load, unload, transcribe."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ctranslate2
import msgspec
import numpy as np
from faster_whisper import BatchedInferencePipeline, WhisperModel

from dalston.contracts import ChannelTranscript, Segment, TranscribeOptions, Word
from dalston.pcm import SAMPLE_RATE
from dalston.sdk import ModelActor, TaskCancelled
from dalston.sdk.announcer import SegmentSink

# Whisper's own bound (faster-whisper's compression_ratio_threshold): text that gzips better than
# this is the model repeating itself, not speech.
LOOP_COMPRESSION = 2.4


class FasterWhisperActor(ModelActor):
    runtime = "faster-whisper"

    @property
    def device(self) -> str:
        wanted = self.settings.device
        if wanted == "auto":
            return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        return wanted

    def load(self, runtime_model_id: str, path: Path) -> WhisperModel:
        compute_type = self.settings.compute_type
        if compute_type == "default":
            # int8 on CPU is ~3x faster than float32 at the same accuracy for Whisper.
            compute_type = "int8" if self.device == "cpu" else "float16"
        return WhisperModel(str(path), device=self.device, compute_type=compute_type,
                            cpu_threads=self.settings.cpu_threads)

    def unload(self, handle: WhisperModel) -> None:
        # CTranslate2 frees its weights when the last reference goes; unload_model makes it
        # happen now even if a stray reference (a traceback, say) survives.
        handle.model.unload_model()

    @property
    def batch_size(self) -> int:
        # 8 measured best on CPU (README, Benchmarks); a GPU has room for more windows at once.
        return self.settings.batch_size or (16 if self.device == "cuda" else 8)

    def transcribe(self, handle: WhisperModel, audio: np.ndarray, options: TranscribeOptions,
                   cancelled: threading.Event, emit: SegmentSink) -> ChannelTranscript:
        vad_parameters = options.vad_parameters and msgspec.structs.asdict(options.vad_parameters)
        # Batched decoding of a file's speech regions (found by the VAD): faster, and deterministic
        # (one temperature, no conditioning on earlier text). The SDK makes sentences of the words.
        batched = self.batch_size > 1 and options.vad
        decoder = BatchedInferencePipeline(handle) if batched else handle
        # Unbatched, a window that fails the compression or log-probability check is decoded
        # again by sampling at higher temperatures: seeded, so one input gives one transcript.
        decode = dict(
            language=options.language or None, task=options.task,
            initial_prompt=options.prompt or None, hotwords=options.hotwords or None,
            temperature=options.temperature or [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
            beam_size=options.beam_size, vad_filter=options.vad, vad_parameters=vad_parameters,
            word_timestamps=options.word_timestamps, prefix=options.prefix or None)
        if options.prefix:
            # In timestamp mode Whisper often ends the window right after a prefix
            # ("<prefix><|2.96|><|endoftext|>", read as no speech after it), and the rest of the
            # audio is lost (faster-whisper issue 326): so were words after 18 of 91 prefixes of
            # real turns in tests/data, and none without timestamp tokens, where it decodes on to
            # the end. Word times come from the alignment all the same.
            decode.update(without_timestamps=True)
        if options.draft:
            # The beam stays: greedy partials misheard words the beam got right ("I need to
            # design" for "Neither did I" on call_2spk), and the final continues from the words
            # two partials agreed on. It cost +0-3% on 2-5 s turns, +30% at 10 s (the encoder's
            # fixed 30 s window is most of a short decode).
            decode.update(temperature=0.0, without_timestamps=True, condition_on_previous_text=False)
        ctranslate2.set_random_seed(0)
        pieces, info = decoder.transcribe(audio, **({"batch_size": self.batch_size} if batched else {}), **decode)
        if batched:
            def again(start: float, end: float):
                # Seeded like the first pass, so a window decoded again is decoded the same way.
                ctranslate2.set_random_seed(0)
                return handle.transcribe(audio[int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)],
                                         **{**decode, "language": info.language})[0]
            pieces = loops_decoded_again(pieces, again, len(audio) / SAMPLE_RATE)
        else:
            pieces = ((piece, 0.0) for piece in pieces)
        segments = []
        for piece, offset in pieces:  # decoded lazily, one 30 s window (or batch) at a time
            if cancelled.is_set():
                raise TaskCancelled()
            segments.append(segment := _segment(piece, options.logprobs, offset))
            emit(segment)
        return ChannelTranscript(
            language=info.language, language_probability=float(info.language_probability),
            duration=info.duration, segments=segments)


def loops_decoded_again(pieces: Iterable, again: Callable[[float, float], Iterable],
                        duration: float) -> Iterator[tuple]:
    """Batched segments as (segment, offset of its times), a window that looped decoded again.

    The batched pipeline decodes each speech window (up to 30 s of the VAD's regions) once, at one
    temperature and without timestamps, so nothing catches a window the model fell into a loop on:
    read sentences between regular pauses gave "The boy was there when the sun rose." nine times
    in place of six sentences. Each window is one segment, so its compression ratio is the
    window's; one above Whisper's bound is decoded again as unbatched Whisper decodes (timestamps,
    temperature fallback) over the audio between its neighbours: its speech, and silence."""
    pieces = iter(pieces)
    current, done = next(pieces, None), 0.0
    while current is not None:
        following = next(pieces, None)
        if current.compression_ratio <= LOOP_COMPRESSION:
            yield current, 0.0
            done = current.end
        else:
            start = min(done, current.start)
            end = max(current.end, following.start if following is not None else duration)
            for piece in again(start, end):
                yield piece, start
                done = start + piece.end
        current = following


def _segment(s, logprobs: bool, offset: float = 0.0) -> Segment:
    # With word timestamps faster-whisper hands out numpy scalars: the wire wants floats.
    return Segment(id=s.id, start=float(s.start + offset), end=float(s.end + offset), text=s.text.strip(),
                   avg_logprob=s.avg_logprob, no_speech_prob=s.no_speech_prob,
                   temperature=s.temperature, compression_ratio=s.compression_ratio,
                   tokens=list(s.tokens),
                   words=[Word(start=float(w.start + offset), end=float(w.end + offset), word=w.word,
                               probability=float(w.probability),
                               logprob=_logprob(w.probability) if logprobs else None)
                          for w in (s.words or [])])


def _logprob(probability: float) -> float:
    # A probability that underflowed to 0 would be -inf, which JSON cannot carry.
    return math.log(max(float(probability), 1e-12))
