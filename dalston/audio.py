"""Audio decoding for the prepare stage: anything ffmpeg reads -> 16 kHz float32 per channel.

Channels that carry the same signal collapse to one, so a mono recording stored as stereo is
transcribed once; truly different channels (one speaker per side) stay separate. Whatever is
not decodable audio becomes `InvalidAudio` with a message the user can act on.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from dalston.pcm import SAMPLE_RATE

# Two channels are "the same" when the energy of their difference is below 1% (-20 dB) of
# their mean energy. Identical channels give 0, unrelated equal-level channels about 2; lossy
# joint-stereo coding or dithering of a duplicated mono signal stays far below 0.01.
SAME_CHANNEL_THRESHOLD = 0.01

# Blocks for the channel comparison, so a long file needs no full-length temporaries.
_BLOCK = 1 << 20


class InvalidAudio(ValueError):
    """The input is not audio we can decode; the message says why in the user's terms."""


@dataclass
class PreparedAudio:
    """Decoded audio: one float32 array in [-1, 1] at `SAMPLE_RATE` per distinct channel."""

    channels: list[np.ndarray]
    duration: float
    source_format: str
    source_rate: int
    source_channels: int


def decode(source: Path | str | BinaryIO, *, max_duration: float | None = None) -> PreparedAudio:
    """Decode `source` (a path or a seekable binary file) frame by frame.

    Raises `InvalidAudio` for anything that is not audio, and for audio longer than
    `max_duration` seconds when that is given.
    """
    head = _head(source)
    if not head:
        raise InvalidAudio("the file is empty")
    try:
        container = av.open(str(source) if isinstance(source, (str, Path)) else source, "r")
    except av.FFmpegError as exc:
        raise InvalidAudio(_unreadable(head)) from exc
    with container:
        if not container.streams.audio:
            raise InvalidAudio("the file has no audio stream (is it a video without sound?)")
        stream = container.streams.audio[0]
        source_format, rate, nchannels = container.format.name, stream.rate, stream.channels
        data = _decode_stream(container, stream, max_duration)
    channels = distinct_channels(data)
    if len(channels) < len(data):
        # Copies, so the dropped duplicates' memory is freed with `data`.
        channels = [channel.copy() for channel in channels]
    return PreparedAudio(
        channels=channels,
        duration=data.shape[1] / SAMPLE_RATE,
        source_format=source_format,
        source_rate=rate,
        source_channels=nchannels,
    )


def _decode_stream(container, stream, max_duration: float | None) -> np.ndarray:
    """All of `stream` resampled to `SAMPLE_RATE` float32, shape (channels, samples)."""
    # Planar float keeps the channels apart; layout and channel count stay the source's.
    resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)
    limit = None if max_duration is None else int(max_duration * SAMPLE_RATE)
    estimate = container.duration / av.time_base if container.duration else 60.0
    # A second of headroom: resampling and padding can run a few samples past the estimate.
    samples = _Samples(int((min(estimate, max_duration or estimate) + 1) * SAMPLE_RATE))
    first_error = None

    def take(frames) -> None:
        for frame in frames:
            samples.append(frame.to_ndarray())
        if limit is not None and samples.size > limit:
            raise InvalidAudio(f"the audio is longer than the limit of {max_duration:g} seconds")

    try:
        for packet in container.demux(stream):
            # A damaged packet is skipped, as ffmpeg does; only a file yielding nothing fails.
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                first_error = first_error or exc
                continue
            for frame in frames:
                take(resampler.resample(frame))
        take(resampler.resample(None))
    except (av.FFmpegError, ValueError) as exc:
        if isinstance(exc, InvalidAudio):
            raise
        raise InvalidAudio(f"the audio data is corrupt and cannot be decoded ({exc})") from exc
    if not samples.size:
        if first_error is not None:
            raise InvalidAudio(f"the audio data is corrupt and cannot be decoded ({first_error})")
        raise InvalidAudio("the file contains no audio samples")
    data = samples.result()
    # Float codecs (mp3, aac, opus) can overshoot full scale slightly.
    np.clip(data, -1.0, 1.0, out=data)
    return data


class _Samples:
    """A growing (channels, samples) float32 buffer, sized from the container's duration.

    Frames are copied straight in, so decoding holds one copy of the audio, not a list of
    chunks plus their concatenation.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: np.ndarray | None = None
        self.size = 0

    def append(self, chunk: np.ndarray) -> None:
        if self.data is None:
            self.data = np.empty((chunk.shape[0], self.capacity), np.float32)
        end = self.size + chunk.shape[1]
        if end > self.data.shape[1]:
            grown = np.empty((self.data.shape[0], max(end, self.data.shape[1] * 3 // 2)),
                             np.float32)
            grown[:, :self.size] = self.data[:, :self.size]
            self.data = grown
        self.data[:, self.size:end] = chunk
        self.size = end

    def result(self) -> np.ndarray:
        data = self.data[:, :self.size]
        # A much too generous estimate (a wrong header) is not kept alive as slack.
        return data.copy() if self.data.shape[1] - self.size > self.size // 8 else data


def distinct_channels(data: np.ndarray) -> list[np.ndarray]:
    """The rows of `data` (channels, samples) with near-duplicates of earlier rows removed."""
    kept: list[np.ndarray] = []
    for channel in data:
        if not any(_same_signal(channel, other) for other in kept):
            kept.append(channel)
    return kept


def _same_signal(a: np.ndarray, b: np.ndarray) -> bool:
    diff = energy = 0.0
    for i in range(0, len(a), _BLOCK):
        x, y = a[i:i + _BLOCK], b[i:i + _BLOCK]
        d = x - y
        diff += float(np.dot(d, d))
        energy += (float(np.dot(x, x)) + float(np.dot(y, y))) / 2
    # Two silent channels are the same; otherwise compare the difference to the signal.
    return diff <= SAME_CHANNEL_THRESHOLD * energy


def _head(source: Path | str | BinaryIO, size: int = 64) -> bytes:
    """The first bytes of `source`, leaving a file object where it was."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            return f.read(size)
    position = source.tell()
    head = source.read(size)
    source.seek(position)
    return head


def _unreadable(head: bytes) -> str:
    """Why ffmpeg could not open a file, guessed from its first bytes."""
    if head.startswith(b"RIFF") and len(head) < 44:
        return "the WAV file is truncated: its header is incomplete"
    if head.startswith((b"RIFF", b"RIFX", b"RF64")):
        return "the WAV file is corrupt: its header cannot be read"
    try:
        # Incremental, so a character cut at the end of `head` does not count against it.
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        return "the file contains text, not audio"
    return "the file is not in an audio format that can be read (unrecognised or corrupt data)"
