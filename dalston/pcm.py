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


def from_pcm16(data: bytes, rate: int) -> np.ndarray:
    """16-bit little-endian mono PCM at `rate` (a multiple of 8 kHz) as 16 kHz float32."""
    samples = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
    if rate == SAMPLE_RATE:
        return samples
    # Up to the least common multiple of both rates, low-pass below the lower Nyquist, down:
    # a windowed-sinc polyphase resampler in a few lines of numpy.
    common = np.lcm(rate, SAMPLE_RATE)
    up, down = common // rate, common // SAMPLE_RATE
    cutoff = 0.9 * min(rate, SAMPLE_RATE) / 2 / common
    taps = np.arange(-16 * max(up, down), 16 * max(up, down) + 1)
    kernel = 2 * cutoff * np.sinc(2 * cutoff * taps) * np.hamming(len(taps)) * up
    stuffed = np.zeros(len(samples) * up, dtype=np.float32)
    stuffed[::up] = samples
    return np.convolve(stuffed, kernel, mode="same")[::down].astype(np.float32)
