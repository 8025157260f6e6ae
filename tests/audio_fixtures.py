"""Test audio: the shared speech files, and variants of them made with ffmpeg and espeak-ng.

Every maker writes into the `tmp_dir` it is given and returns the new file's path; it skips
the calling test (pytest.skip) when the tool it needs is not installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

# The speech files the tests use ship with the repository (tests/data/audio, Apache-2.0: see
# its README); DALSTON_TEST_AUDIO points elsewhere.
AUDIO_DIR = Path(os.environ.get("DALSTON_TEST_AUDIO", Path(__file__).resolve().parent / "data" / "audio"))
DIALOGUE = AUDIO_DIR / "dialogue.wav"
DIALOGUE_STEREO = AUDIO_DIR / "dialogue_stereo.wav"
INVALID_FILES = sorted((AUDIO_DIR / "invalid").glob("*"))
DIALOGUE_TEXT = (
    "That was hilarious, I can't believe you said that. "
    "What do you mean? I was really serious about it."
)

# Name -> (suffix, convert() keywords) of the dialogue's variants in other formats.
VARIANTS: dict[str, tuple[str, dict]] = {
    "mp3": (".mp3", {"codec": "libmp3lame"}),
    "flac": (".flac", {"codec": "flac"}),
    "opus": (".ogg", {"codec": "libopus"}),
    "wav8k": (".wav", {"rate": 8000}),
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def _run(command: list[str], timeout: float = 60) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")


def convert(
    src: Path,
    suffix: str,
    tmp_dir: Path,
    *,
    rate: int | None = None,
    channels: int | None = None,
    codec: str | None = None,
    args: Sequence[str] = (),
) -> Path:
    """`src` re-encoded by ffmpeg into `tmp_dir` (format from `suffix`, e.g. ".mp3").

    `args` are extra ffmpeg output options, e.g. ("-af", "pan=stereo|c0=c0|c1=c0").
    """
    options = [*(["-ar", str(rate)] if rate else []), *(["-ac", str(channels)] if channels else []),
               *(["-c:a", codec] if codec else []), *args]
    # The options are part of the name, so variants of one source do not overwrite each other.
    digest = hashlib.sha1(" ".join(options).encode()).hexdigest()[:8]
    dst = Path(tmp_dir) / f"{Path(src).stem}-{digest}{suffix}"
    if not dst.exists():
        _run([_tool("ffmpeg"), "-nostdin", "-loglevel", "error", "-y", "-i", str(src),
              *options, str(dst)])
    return dst


def variant(name: str, tmp_dir: Path) -> Path:
    """The dialogue as one of `VARIANTS` ("mp3", "flac", "opus", "wav8k")."""
    suffix, options = VARIANTS[name]
    return convert(DIALOGUE, suffix, tmp_dir, **options)


def duplicated_stereo(tmp_dir: Path, suffix: str = ".wav") -> Path:
    """The mono dialogue copied onto both channels of a stereo file."""
    return convert(DIALOGUE, suffix, tmp_dir, channels=2)


def looped_dialogue(times: int, tmp_dir: Path) -> Path:
    """The dialogue `times` over in one WAV file (eight times: about 45 s)."""
    dst = Path(tmp_dir) / f"dialogue-x{times}.wav"
    if not dst.exists():
        _run([_tool("ffmpeg"), "-nostdin", "-loglevel", "error", "-y", "-stream_loop", str(times - 1),
              "-i", str(DIALOGUE), "-c", "copy", str(dst)])
    return dst


def silent_video(tmp_dir: Path) -> Path:
    """A one-second black video with no audio stream."""
    dst = Path(tmp_dir) / "no_audio.mp4"
    if not dst.exists():
        _run([_tool("ffmpeg"), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
              "-i", "color=c=black:s=32x32:d=1", "-c:v", "mpeg4", str(dst)])
    return dst


def speak(text: str, voice: str, tmp_dir: Path, words_per_minute: int = 175) -> Path:
    """`text` spoken by espeak-ng's `voice` (e.g. "de") into a WAV file in `tmp_dir`."""
    digest = hashlib.sha1(f"{voice}\0{words_per_minute}\0{text}".encode()).hexdigest()[:8]
    dst = Path(tmp_dir) / f"speech-{voice}-{digest}.wav"
    if not dst.exists():
        _run([_tool("espeak-ng"), "-v", voice, "-s", str(words_per_minute), "-w", str(dst), text])
    return dst


def german_clip(tmp_dir: Path) -> Path:
    """A German sentence, spoken by espeak-ng: one that base (int8, the CPU default) hears as
    German with confidence (0.83); on a short greeting it guesses Thai at 0.35."""
    return speak("Das Wetter ist heute sehr schön, und wir gehen am Nachmittag in den Park spazieren.", "de", tmp_dir)


def silence(tmp_dir: Path, seconds: float, suffix: str, *, layout: str = "mono", rate: int = 8000,
            codec_args: Sequence[str] = ()) -> Path:
    """`seconds` of digital silence in `layout` ("mono", "5.1"), encoded by ffmpeg."""
    options = [f"anullsrc=r={rate}:cl={layout}", str(seconds), *codec_args]
    digest = hashlib.sha1(" ".join(options).encode()).hexdigest()[:8]
    dst = Path(tmp_dir) / f"silence-{digest}{suffix}"
    if not dst.exists():
        _run([_tool("ffmpeg"), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
              "-i", options[0], "-t", str(seconds), *codec_args, str(dst)], timeout=300)
    return dst


def long_opus(tmp_dir: Path, seconds: int) -> Path:
    """`seconds` (a multiple of 600) of silent Ogg Opus at 6 kbps in seconds of work: ten
    minutes encoded once, then repeated without re-encoding (correct granules: the Ogg header
    states the full length)."""
    piece = silence(tmp_dir, 600, ".ogg", rate=48000,
                    codec_args=["-c:a", "libopus", "-b:a", "6k", "-frame_duration", "120"])
    return repeated(piece, seconds // 600, tmp_dir)


def repeated(src: Path, times: int, tmp_dir: Path) -> Path:
    """`src` `times` over, packets copied. A FLAC made so keeps the first copy's STREAMINFO:
    its header states the length of `src` alone."""
    dst = Path(tmp_dir) / f"{src.stem}-x{times}{src.suffix}"
    if not dst.exists():
        _run([_tool("ffmpeg"), "-nostdin", "-loglevel", "error", "-y",
              "-stream_loop", str(times - 1), "-i", str(src), "-c", "copy", str(dst)])
    return dst


def spread_stereo(tmp_dir: Path, channels: int, suffix: str = ".wav", codec: str | None = None) -> Path:
    """The stereo dialogue (one speaker a side) on `channels` channels: left on the even ones,
    right on the odd ones, so two of them are distinct."""
    pan = "|".join(f"c{i}=c{i % 2}" for i in range(channels))
    return convert(DIALOGUE_STEREO, suffix, tmp_dir, codec=codec, args=["-af", f"pan={channels}c|{pan}"])
