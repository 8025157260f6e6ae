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


# The most this resampler stuffs the audio by: speech rates (8, 16, 24, 48 kHz) need at most 6.
MAX_UPSAMPLING = 8


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Float32 `samples` at `rate` as float32 at `target` (rates with a common factor of 8 kHz
    or so, as speech rates are: the filter is as long as their least common multiple needs)."""
    if rate == target:
        return samples.astype(np.float32, copy=False)
    # Up to the least common multiple of both rates, low-pass below the lower Nyquist, down:
    # a windowed-sinc resampler in a few lines of numpy.
    common = np.lcm(rate, target)
    up, down = common // rate, common // target
    if up > MAX_UPSAMPLING:
        # 22,050 Hz to 16 kHz would hold 320 times the audio and a 14,000-tap filter.
        raise ValueError(f"cannot resample {rate} Hz to {target} Hz here: rates without a large "
                         f"common factor are decoded by ffmpeg (dalston.audio), not by this filter")
    cutoff = 0.9 * min(rate, target) / 2 / common
    taps = np.arange(-16 * max(up, down), 16 * max(up, down) + 1)
    kernel = 2 * cutoff * np.sinc(2 * cutoff * taps) * np.hamming(len(taps)) * up
    stuffed = np.zeros(len(samples) * up, dtype=np.float32)
    stuffed[::up] = samples
    return np.convolve(stuffed, kernel, mode="same")[::down].astype(np.float32)


def from_pcm16(data: bytes, rate: int) -> np.ndarray:
    """16-bit little-endian mono PCM at `rate` as 16 kHz float32."""
    samples = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
    return resample(samples, rate, SAMPLE_RATE)


def to_pcm16(samples: np.ndarray) -> bytes:
    """Float32 samples in [-1, 1] as 16-bit little-endian PCM."""
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
