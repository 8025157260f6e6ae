"""Prepared audio between stages: raw little-endian float32 samples, 16 kHz mono.

Its own module so that engines read it without PyAV (which only audio-prepare needs).
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000
DTYPE = np.dtype("<f4")


class SampleBuffer:
    """A file-like sink that raw float32 bytes are written into, chunk by chunk, straight into
    one preallocated array: a download of `size` bytes holds one copy of the audio."""

    def __init__(self, size: int) -> None:
        if size % DTYPE.itemsize:
            raise ValueError(f"raw float32 audio must be a multiple of 4 bytes, got {size}")
        self._samples = np.empty(size // DTYPE.itemsize, DTYPE)
        self._bytes = memoryview(self._samples).cast("B")
        self._filled = 0

    def write(self, data: bytes) -> int:
        end = self._filled + len(data)
        if end > len(self._bytes):
            raise ValueError(f"more than the {len(self._bytes)} bytes of raw audio announced")
        self._bytes[self._filled:end] = data
        self._filled = end
        return len(data)

    def samples(self) -> np.ndarray:
        """The filled array, native float32 and writable."""
        if self._filled != len(self._bytes):
            raise ValueError(f"raw audio ended after {self._filled} of {len(self._bytes)} bytes")
        return self._samples.astype(np.float32, copy=False)
