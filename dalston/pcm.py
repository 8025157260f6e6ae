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
