"""Audio decoding for the prepare stage: anything ffmpeg reads -> 16 kHz float32 per channel.

Decoding streams: each channel's samples go to a raw float32 file (`dalston.pcm`) block by
block, and channels are compared as the blocks pass, so memory stays a few megabytes whatever
the file's length. Channels that carry the same signal collapse to one, so a mono recording
stored as stereo is transcribed once; truly different channels (one speaker per side) stay
separate. Whatever is not decodable audio, or is longer than allowed, becomes `InvalidAudio`
with a message the user can act on.
"""

from __future__ import annotations

import codecs
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from dalston.pcm import DTYPE, SAMPLE_RATE

# Two channels are "the same" when the energy of their difference is below 1% (-20 dB) of
# their mean energy. Identical channels give 0, unrelated equal-level channels about 2; lossy
# joint-stereo coding or dithering of a duplicated mono signal stays far below 0.01.
SAME_CHANNEL_THRESHOLD = 0.01

# Samples per channel in one block: written, compared and checked against the limit together
# (4 s; 256 KiB a channel).
BLOCK_SAMPLES = 1 << 16

# The most channels ffmpeg's resampler takes (SWR_CH_MAX).
MAX_READABLE_CHANNELS = 64

# Containers whose stated duration is exact (sample counts, last granule, data size), not
# guessed from a bitrate as for headerless MP3 or ADTS AAC: only these are refused undecoded.
_EXACT_DURATION_FORMATS = {"wav", "w64", "aiff", "caf", "flac", "ogg", "matroska,webm",
                           "mov,mp4,m4a,3gp,3g2,mj2"}


class InvalidAudio(ValueError):
    """The input is not audio we can decode; the message says why in the user's terms."""


class AudioTooLong(InvalidAudio):
    """Audio longer than the `max_duration` asked of `decode`."""


@dataclass
class PreparedAudio:
    """Decoded audio: one raw float32 file in [-1, 1] at `SAMPLE_RATE` per distinct channel."""

    channels: list[Path]
    duration: float
    source_format: str
    source_rate: int
    source_channels: int


def decode(source: Path | str | BinaryIO, directory: Path, *, max_duration: float | None = None,
           max_channels: int | None = None) -> PreparedAudio:
    """Decode `source` (a path or a seekable binary file) into channel files in `directory`.

    Raises `InvalidAudio` for anything that is not audio, and for audio longer than
    `max_duration` seconds (DALSTON_MAX_AUDIO_SECONDS) when that is given: at once where the
    container states its duration, else as soon as the decoded samples pass the limit.
    Audio of more than `max_channels` channels (DALSTON_MAX_CHANNELS) is down-mixed to mono.
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
        if stream.channels > MAX_READABLE_CHANNELS:
            raise InvalidAudio(f"the audio has {stream.channels} channels; at most "
                               f"{MAX_READABLE_CHANNELS} can be read")
        stated = _stated_duration(container)
        if max_duration is not None and stated is not None and stated > max_duration:
            raise _too_long(max_duration, stated)
        with _ChannelFiles(directory) as files:
            _decode_stream(container, stream, files, max_duration, max_channels)
        return PreparedAudio(
            channels=files.distinct(),
            duration=files.samples / SAMPLE_RATE,
            source_format=container.format.name,
            source_rate=stream.rate,
            source_channels=stream.channels,
        )


def _stated_duration(container) -> float | None:
    """The duration the container states exactly, in seconds; None where it only guesses."""
    if container.format.name not in _EXACT_DURATION_FORMATS or container.duration is None:
        return None
    return container.duration / av.time_base


def _decode_stream(container, stream, files: _ChannelFiles, max_duration: float | None,
                   max_channels: int | None) -> None:
    """All of `stream`, resampled to `SAMPLE_RATE` float32, appended to `files` block by block."""
    limit = None if max_duration is None else int(max_duration * SAMPLE_RATE)
    # Packed float, de-interleaved here: PyAV 18 reads past the plane pointers of planar frames
    # with 8 or more channels and crashes the process.
    resampler = av.AudioResampler(format="flt", rate=SAMPLE_RATE, frame_size=BLOCK_SAMPLES)
    first_error = None

    def take(blocks) -> None:
        for block in blocks:
            channels = block.layout.nb_channels
            samples = block.to_ndarray().reshape(block.samples, channels)
            if max_channels is not None and channels > max_channels:
                # Down-mixed to their mean: one transcript, not one per channel.
                files.append(samples.mean(axis=1, dtype=np.float32)[np.newaxis])
            else:
                files.append(samples.T.copy())
        if limit is not None and files.samples > limit:
            raise _too_long(max_duration)

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
    if not files.samples:
        if first_error is not None:
            raise InvalidAudio(f"the audio data is corrupt and cannot be decoded ({first_error})")
        raise InvalidAudio("the file contains no audio samples")


class _ChannelFiles:
    """Each channel's samples appended to its own raw float32 file in `directory`, with the
    energies that tell duplicated channels apart accumulated on the way."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.paths: list[Path] = []
        self.samples = 0
        self._files = contextlib.ExitStack()
        self._outputs: list[BinaryIO] = []
        self._energy = np.zeros(0)
        self._difference = np.zeros((0, 0))  # [i, j], j < i: energy of channel i - channel j

    def __enter__(self) -> _ChannelFiles:
        return self

    def __exit__(self, *exc_info) -> None:
        self._files.close()
        if exc_info[0] is not None:
            for path in self.paths:
                path.unlink(missing_ok=True)

    def append(self, block: np.ndarray) -> None:
        """Append `block` (channels, samples), a float32 array this object may modify."""
        if not self._outputs:
            self._open(block.shape[0])
        # Float codecs (mp3, aac, opus) can overshoot full scale slightly.
        np.clip(block, -1.0, 1.0, out=block)
        for output, channel in zip(self._outputs, block):
            channel.astype(DTYPE, copy=False).tofile(output)
        for i, channel in enumerate(block):
            self._energy[i] += float(np.dot(channel, channel))
            for j in range(i):
                difference = channel - block[j]
                self._difference[i, j] += float(np.dot(difference, difference))
        self.samples += block.shape[1]

    def _open(self, count: int) -> None:
        self.paths = [self.directory / f"ch{i}.f32" for i in range(count)]
        self._outputs = [self._files.enter_context(path.open("wb")) for path in self.paths]
        self._energy = np.zeros(count)
        self._difference = np.zeros((count, count))

    def distinct(self) -> list[Path]:
        """The files of channels that are not near-duplicates of an earlier one; the others
        are deleted."""
        kept: list[int] = []
        for i, path in enumerate(self.paths):
            if any(self._same_signal(i, j) for j in kept):
                path.unlink()
            else:
                kept.append(i)
        return [self.paths[i] for i in kept]

    def _same_signal(self, i: int, j: int) -> bool:
        energy = (self._energy[i] + self._energy[j]) / 2
        # Two silent channels are the same; otherwise compare the difference to the signal.
        return self._difference[i, j] <= SAME_CHANNEL_THRESHOLD * energy


def _too_long(max_duration: float, stated: float | None = None) -> AudioTooLong:
    """Audio over the limit; `stated` is the length its header gives, where it was refused unread."""
    length = "is longer" if stated is None else f"lasts {_span(stated)}, longer"
    return AudioTooLong(f"the audio {length} than the limit of {_span(max_duration)} "
                        "set by DALSTON_MAX_AUDIO_SECONDS")


def _span(seconds: float) -> str:
    """A duration for a message: "5.6 seconds", "14400 seconds (4.0 hours)"."""
    text = f"{seconds:.0f} seconds" if seconds >= 100 else f"{seconds:.3g} seconds"
    return f"{text} ({seconds / 3600:.1f} hours)" if seconds >= 3600 else text


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
