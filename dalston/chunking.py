"""Where a long recording is cut so that several engines can transcribe it at once.

Cuts fall near every `chunk_seconds`, at the quietest moment within a window around each nominal
boundary: the pause between two sentences, so no word is split. Quietness is short-time energy of
all channels together, smoothed over a few hundred milliseconds, so a cut is shared by every
channel and lands in a gap, not in a plosive's brief silence. Only the search windows are read,
from the channel files on disk: cutting a 4-hour file reads a few seconds of it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dalston.pcm import DTYPE, SAMPLE_RATE

FRAME_SECONDS = 0.02
# Energy is averaged over this long, so a cut lands in a pause rather than a consonant's gap.
SMOOTHING_SECONDS = 0.4
# A cut may move this share of a chunk away from its nominal place to find a pause.
SEARCH_SHARE = 0.2
# A tail shorter than this share of a chunk joins the chunk before it instead.
MIN_TAIL_SHARE = 0.5


def chunk_starts(channels: list[Path], samples: int, chunk_seconds: float) -> list[int]:
    """The first sample of every chunk (the first is 0); one chunk when the audio is short."""
    chunk = int(chunk_seconds * SAMPLE_RATE)
    if chunk <= 0 or samples < chunk * (1 + MIN_TAIL_SHARE):
        return [0]
    reach = int(chunk * SEARCH_SHARE)
    mapped = [np.memmap(path, dtype=DTYPE, mode="r", shape=(samples,)) for path in channels]
    starts = [0]
    while samples - starts[-1] >= chunk * (1 + MIN_TAIL_SHARE):
        nominal = starts[-1] + chunk
        low, high = max(starts[-1] + chunk - reach, 1), min(nominal + reach, samples - 1)
        starts.append(low + quietest(np.sum([np.square(m[low:high], dtype=np.float32) for m in mapped], axis=0)))
    return starts


def quietest(power: np.ndarray) -> int:
    """The index (in samples) of the middle of the quietest stretch of `power` (squared samples)."""
    frame = int(FRAME_SECONDS * SAMPLE_RATE)
    frames = len(power) // frame
    if frames == 0:
        return len(power) // 2
    energy = power[:frames * frame].reshape(frames, frame).mean(axis=1)
    width = max(1, int(SMOOTHING_SECONDS / FRAME_SECONDS))
    smoothed = np.convolve(energy, np.ones(width) / width, mode="same")
    # Among equally quiet frames (digital silence), the one nearest the middle of the window.
    candidates = np.flatnonzero(smoothed <= smoothed.min() * 1.0001 + 1e-12)
    best = candidates[np.argmin(np.abs(candidates - frames // 2))]
    return int(best * frame + frame // 2)


class ByteRange(io.RawIOBase):
    """A read-only file object over `length` bytes of a file from `offset`: a chunk of a channel
    file, streamed into the object store without copying it out first."""

    def __init__(self, path: Path, offset: int, length: int) -> None:
        super().__init__()
        self._file = path.open("rb")
        self._file.seek(offset)
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[:self._left]
        read = self._file.readinto(view)
        self._left -= read
        return read

    def close(self) -> None:
        self._file.close()
        super().close()
