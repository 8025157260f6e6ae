"""One utterance as a Wyoming client streams it: raw PCM chunks in the format its `audio-start`
announced, kept as a WAV file (up to 1 MiB in memory, the rest in a temporary file), bounded
by DALSTON_MAX_AUDIO_SECONDS and DALSTON_MAX_UPLOAD_MB."""

from __future__ import annotations

import tempfile
import wave
from typing import IO

# In memory up to this size, as the gateway spools uploads.
SPOOL_BYTES = 1024 * 1024
# What a Wyoming audio stream may announce: PCM of 1 to 4 bytes a sample, at a rate from
# telephone-grade down to a tenth of it and up to studio rates.
RATES = range(800, 192_001)
WIDTHS = range(1, 5)


class BadAudio(ValueError):
    """Audio that does not fit its announced format or the bounds; the text says which."""


class Utterance:
    def __init__(self, rate: int, width: int, channels: int, *, max_channels: int, max_seconds: float,
                 max_bytes: int) -> None:
        if rate not in RATES or width not in WIDTHS or not 1 <= channels <= max_channels:
            raise BadAudio(f"audio-start must give a rate of {RATES.start}-{RATES.stop - 1} Hz, a width of "
                           f"{WIDTHS.start}-{WIDTHS.stop - 1} bytes and 1-{max_channels} channels "
                           "(DALSTON_MAX_CHANNELS)")
        self.rate, self.width, self.channels = rate, width, channels
        self.frame_bytes = width * channels
        self.max_seconds = max_seconds
        self.max_bytes = min(max_bytes, int(max_seconds * rate) * self.frame_bytes)
        self.size = 0
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self._wav = wave.open(self._file, "wb")
        self._wav.setnchannels(channels)
        self._wav.setsampwidth(width)
        self._wav.setframerate(rate)

    def add(self, rate: int, width: int, channels: int, pcm: bytes) -> None:
        """Append a chunk said to be in (`rate`, `width`, `channels`)."""
        if (rate, width, channels) != (self.rate, self.width, self.channels):
            raise BadAudio(f"an audio-chunk of {rate} Hz, {width} bytes, {channels} channels in a stream "
                           f"that audio-start said is {self.rate} Hz, {self.width} bytes, {self.channels} channels")
        if len(pcm) % self.frame_bytes:
            raise BadAudio(f"an audio-chunk of {len(pcm)} bytes is not whole frames of {self.frame_bytes} bytes")
        if self.size + len(pcm) > self.max_bytes:
            raise BadAudio(f"the audio is longer than the limit of {self.max_seconds:g} s "
                           "(DALSTON_MAX_AUDIO_SECONDS, DALSTON_MAX_UPLOAD_MB)")
        self._wav.writeframesraw(pcm)
        self.size += len(pcm)

    def wav(self) -> IO[bytes]:
        """The WAV file, complete, read from its start; nothing may be added after."""
        self._wav.close()  # writes the lengths into the header; the file stays open
        self._file.seek(0)
        return self._file

    async def close(self) -> None:
        try:
            self._wav.close()  # or it would write to the closed file when collected
        finally:
            self._file.close()
