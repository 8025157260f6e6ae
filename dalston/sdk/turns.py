"""A live session's audio cut into turns: by server voice activity detection, or where the
client commits.

Server VAD is Silero VAD (the v6 model faster-whisper ships), run as a stream: each 32 ms frame
gets a speech probability. As OpenAI documents server_vad, a frame is speech when that
probability reaches `threshold`; a turn starts at speech (keeping `prefix_padding_ms` of what
came before) and ends, committed, after `silence_duration_ms` of silence. Like Silero's own
iterator, silence needs a probability 0.15 below the threshold, and speech must last a few
frames to start a turn, so a click does not. Without turn detection the audio gathers until the
client commits it.

Audio comes at the session's sample rate (SessionConfig.sample_rate). The audio held is bounded: a client-committed buffer past `max_ms` is refused (`BufferFull`), a
server VAD turn that long is committed where it stands and the speech goes on in a new turn.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass

import numpy as np

from dalston.contracts import SESSION_SAMPLE_RATE, TurnDetection
from dalston.pcm import SAMPLE_RATE, resample

FRAME_MS = 32  # Silero VAD's frame: 512 samples at 16 kHz
# Silence is a probability this far below the threshold (Silero's hysteresis).
SILENCE_MARGIN = 0.15
# A commit with less audio than this has nothing to transcribe.
MIN_TURN_MS = 100


class BufferFull(Exception):
    """The client sent more uncommitted audio than a session may hold."""


@dataclass
class TurnEvent:
    kind: str  # speech_started, speech_stopped or committed
    item_id: str
    audio_ms: int = 0  # speech_started, speech_stopped: where in the session's audio
    audio: bytes = b""  # committed: the turn, 16-bit PCM at the session's rate
    spoken: int = 0  # committed: bytes of `audio` up to the end of its speech
    start_ms: int = 0  # committed: where `audio` starts in the session's audio


@functools.cache
def _silero():
    """The ONNX session, one per process: `run` is thread-safe, the state lives with each caller."""
    import onnxruntime
    from faster_whisper.utils import get_assets_path

    options = onnxruntime.SessionOptions()
    options.inter_op_num_threads = options.intra_op_num_threads = 1
    options.log_severity_level = 4
    return onnxruntime.InferenceSession(f"{get_assets_path()}/silero_vad_v6.onnx",
                                        providers=["CPUExecutionProvider"], sess_options=options)


class SpeechProbability:
    """Silero VAD over a stream: its recurrent state and the last frame's tail carried over, so
    feeding audio piece by piece gives what one pass over all of it gives (but for the resampler's
    edges at each piece)."""

    SAMPLES, CONTEXT = 512, 64

    def __init__(self, rate: int = SESSION_SAMPLE_RATE) -> None:
        self.rate = rate
        self._state = np.zeros((1, 1, 128), np.float32), np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros((1, self.CONTEXT), np.float32)

    def __call__(self, pcm: bytes) -> np.ndarray:
        """One probability per FRAME_MS of `pcm` (whole frames of session audio)."""
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        frames = resample(samples, self.rate, SAMPLE_RATE).reshape(-1, self.SAMPLES)
        tails = np.concatenate([self._context, frames[:-1, -self.CONTEXT:]])
        self._context = frames[-1:, -self.CONTEXT:]
        (h, c) = self._state
        probabilities, h, c = _silero().run(None, {"input": np.concatenate([tails, frames], 1), "h": h, "c": c})
        self._state = h, c
        return probabilities.reshape(-1)


class Turns:
    def __init__(self, detection: TurnDetection | None, max_ms: int, rate: int = SESSION_SAMPLE_RATE) -> None:
        self.detection = detection  # None: the client commits
        self.rate, self.frame_bytes = rate, rate * FRAME_MS // 1000 * 2
        self.max_bytes = max_ms * self.frame_bytes // FRAME_MS
        # While set, server VAD does not end a turn at a silence (the session's queue of turns
        # is full): the turn goes on, and ends at the first silence after it is cleared.
        self.hold = False
        self._speech = SpeechProbability(rate)
        self._buffer = bytearray()  # the turn so far (or, between turns, the prefix padding)
        self._partial = b""  # the start of a frame not complete yet
        self._audio_bytes = 0  # of the session's audio so far
        self._item: str | None = None  # the turn in progress
        self._run = 0  # speech frames in a row before a turn
        self._silence_ms = 0
        self._spoken = 0  # bytes of the turn up to its last frame that was not silence

    @property
    def turn(self) -> tuple[str, int, int] | None:
        """The turn in progress: its item, the bytes of its audio so far, and of its speech."""
        return None if self._item is None else (self._item, len(self._buffer), self._spoken)

    def turn_audio(self) -> bytes:
        return bytes(self._buffer)

    def ms(self, size: int) -> int:
        """`size` bytes of the session's audio in milliseconds."""
        return size * 1000 // (2 * self.rate)

    @property
    def _audio_ms(self) -> int:
        return self.ms(self._audio_bytes)

    def feed(self, pcm: bytes) -> list[TurnEvent]:
        """Take in audio; what server VAD saw in it."""
        if self.detection is None:
            if len(self._buffer) + len(pcm) > self.max_bytes:
                raise BufferFull(f"the buffer holds more than {self.ms(self.max_bytes) // 1000} s "
                                 "of uncommitted audio (DALSTON_MAX_SESSION_BUFFER_SECONDS)")
            # What the client will commit is one turn from its first audio: its partials show.
            self._item = self._item or _item_id()
            self._buffer += pcm
            self._audio_bytes += len(pcm)
            self._spoken = len(self._buffer)
            return []
        data, events, size = self._partial + pcm, [], self.frame_bytes
        whole = len(data) // size * size
        self._partial = data[whole:]
        if whole:
            for number, probability in enumerate(self._speech(data[:whole])):
                events += self._frame(data[number * size:(number + 1) * size], float(probability))
        return events

    def _frame(self, frame: bytes, probability: float) -> list[TurnEvent]:
        vad = self.detection
        self._audio_bytes += len(frame)
        self._buffer += frame
        if self._item is None:
            self._run = self._run + 1 if probability >= vad.threshold else 0
            # A turn starts after min_speech_ms of speech in a row (Silero's iterator waits 250 ms
            # before it keeps a region; a live turn cannot wait that long).
            start_frames = max(1, -(-vad.min_speech_ms // FRAME_MS))
            if self._run >= start_frames:
                self._item, self._silence_ms, self._spoken = _item_id(), 0, len(self._buffer)
                speech_ms = start_frames * FRAME_MS
                padding = min(vad.prefix_padding_ms, self.ms(len(self._buffer)) - speech_ms)
                return [TurnEvent("speech_started", self._item, self._audio_ms - speech_ms - padding)]
            keep = (vad.prefix_padding_ms // FRAME_MS + start_frames) * self.frame_bytes
            del self._buffer[:max(0, len(self._buffer) - keep)]
            return []
        if probability >= vad.threshold - SILENCE_MARGIN:
            self._spoken = len(self._buffer)
            if probability >= vad.threshold:
                self._silence_ms = 0
        else:
            self._silence_ms += FRAME_MS
        if self._silence_ms >= vad.silence_duration_ms and not self.hold:
            stopped = TurnEvent("speech_stopped", self._item, self._audio_ms - self._silence_ms)
            return [stopped, self.commit()]
        if len(self._buffer) >= self.max_bytes:
            # Speech this long without a pause: the turn so far is committed, the speech goes on.
            item, committed = self._item, self.commit()
            self._item, self._spoken = _item_id(), 0
            return [TurnEvent("speech_stopped", item, self._audio_ms), committed,
                    TurnEvent("speech_started", self._item, self._audio_ms)]
        return []

    def commit(self) -> TurnEvent | None:
        """The buffer as a committed turn; None when it holds too little audio to be one."""
        if self.ms(len(self._buffer)) < MIN_TURN_MS:
            return None
        event = TurnEvent("committed", self._item or _item_id(), self._audio_ms, bytes(self._buffer),
                          self._spoken, self.ms(self._audio_bytes - len(self._buffer)))
        self.clear()
        return event

    def clear(self) -> None:
        self._buffer.clear()
        self._item, self._run, self._silence_ms, self._spoken = None, 0, 0, 0


def _item_id() -> str:
    return f"item_{uuid.uuid4().hex[:20]}"
