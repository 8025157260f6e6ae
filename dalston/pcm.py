"""Prepared audio between stages: raw little-endian float32 samples, 16 kHz mono.

Its own module so that engines read it without PyAV (which only audio-prepare needs).
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000


def to_bytes(channel: np.ndarray) -> bytes:
    """Raw little-endian float32 samples, as stored between stages."""
    return np.asarray(channel, dtype="<f4").tobytes()


def from_bytes(data: bytes) -> np.ndarray:
    """The inverse of `to_bytes`: a writable float32 array."""
    if len(data) % 4:
        raise ValueError(f"raw float32 audio must be a multiple of 4 bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)



def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Float32 `samples` at `rate` as float32 at `target` (rates with a common factor of 8 kHz
    or so, as speech rates are: the filter is as long as their least common multiple needs)."""
    if rate == target:
        return samples.astype(np.float32, copy=False)
    # Up to the least common multiple of both rates, low-pass below the lower Nyquist, down:
    # a windowed-sinc resampler in a few lines of numpy.
    common = np.lcm(rate, target)
    up, down = common // rate, common // target
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
