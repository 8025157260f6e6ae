"""A live session's audio cut into turns: by server voice activity detection, or where the
client commits.

Server VAD compares each 20 ms frame's level with the session's threshold: a loud frame starts a
turn (keeping `prefix_padding_ms` of what came before), and `silence_duration_ms` of quiet frames
ends and commits it. Without turn detection the audio gathers until the client commits it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from dalston.contracts import SESSION_SAMPLE_RATE, TurnDetection

FRAME_MS = 20
FRAME_BYTES = SESSION_SAMPLE_RATE * FRAME_MS // 1000 * 2
# The threshold (0 to 1) spans these frame levels, in dB below full scale: a quiet room is
# below -50, speech close to a microphone above -30.
QUIETEST_DB, LOUDEST_DB = -50.0, -20.0
# A commit with less audio than this has nothing to transcribe.
MIN_TURN_MS = 100


@dataclass
class TurnEvent:
    kind: str  # speech_started, speech_stopped or committed
    item_id: str
    audio_ms: int = 0  # speech_started, speech_stopped: where in the session's audio
    audio: bytes = b""  # committed: the turn, 16-bit PCM at SESSION_SAMPLE_RATE


class Turns:
    def __init__(self, detection: TurnDetection | None) -> None:
        self.detection = detection  # None: the client commits
        self._buffer = bytearray()  # the turn so far (or, between turns, the prefix padding)
        self._partial = b""  # the start of a frame not complete yet
        self._audio_ms = 0  # of the session's audio so far
        self._item: str | None = None  # the turn in progress
        self._silence_ms = 0

    def feed(self, pcm: bytes) -> list[TurnEvent]:
        """Take in audio; what server VAD saw in it."""
        vad = self.detection
        if vad is None:
            self._buffer += pcm
            self._audio_ms += len(pcm) * 1000 // (2 * SESSION_SAMPLE_RATE)
            return []
        level = 10 ** ((QUIETEST_DB + vad.threshold * (LOUDEST_DB - QUIETEST_DB)) / 20)
        data, events = self._partial + pcm, []
        whole = len(data) // FRAME_BYTES * FRAME_BYTES
        self._partial = data[whole:]
        for start in range(0, whole, FRAME_BYTES):
            frame = data[start:start + FRAME_BYTES]
            self._audio_ms += FRAME_MS
            self._buffer += frame
            samples = np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768.0
            loud = float(np.sqrt(np.mean(samples * samples))) > level
            if self._item is None:
                if loud:
                    self._item, self._silence_ms = _item_id(), 0
                    buffered_ms = len(self._buffer) * FRAME_MS // FRAME_BYTES
                    events.append(TurnEvent("speech_started", self._item, self._audio_ms - buffered_ms))
                else:
                    keep = vad.prefix_padding_ms // FRAME_MS * FRAME_BYTES
                    del self._buffer[:max(0, len(self._buffer) - keep)]
            else:
                self._silence_ms = 0 if loud else self._silence_ms + FRAME_MS
                if self._silence_ms >= vad.silence_duration_ms:
                    events.append(TurnEvent("speech_stopped", self._item, self._audio_ms - self._silence_ms))
                    events.append(self.commit())
        return events

    def commit(self) -> TurnEvent | None:
        """The buffer as a committed turn; None when it holds too little audio to be one."""
        if len(self._buffer) < MIN_TURN_MS * FRAME_BYTES // FRAME_MS:
            return None
        event = TurnEvent("committed", self._item or _item_id(), self._audio_ms, bytes(self._buffer))
        self.clear()
        return event

    def clear(self) -> None:
        self._buffer.clear()
        self._item = None


def _item_id() -> str:
    return f"item_{uuid.uuid4().hex[:20]}"
