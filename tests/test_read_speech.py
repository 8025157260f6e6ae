"""The default path on what tends to go wrong: long read speech between regular pauses (the same
transcript every run, no invented text), and sound without speech (no text at all), through a real
Dalston, whose faster-whisper engines decode in batches by default."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import openai
import pytest

from actors.faster_whisper.actor import loops_decoded_again
from dalston.synthetic_speech import lecture, word_error_rate

BASE = "faster-whisper-base"


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=600)


def transcribe(client, path, model=BASE) -> str:
    with open(path, "rb") as audio:
        return client.audio.transcriptions.create(model=model, file=audio).text


def test_long_read_speech_gives_one_transcript_close_to_what_was_said(client, tmp_path):
    """3.5 minutes of the Harvard sentences, read with 1.5 s pauses, on the default model (base):
    the kind of audio (lectures, dictation) on which unbatched Whisper's fallback to sampling
    invented text. Two runs, one transcript; in-process base scores 0.08-0.10 on it."""
    audio, said = lecture(tmp_path, 210, pause=1.5)
    first, second = transcribe(client, audio), transcribe(client, audio)
    assert first == second
    assert word_error_rate(said, first) <= 0.13, first


def test_a_batched_window_that_loops_is_decoded_again_over_the_audio_between_its_neighbours():
    """faster-whisper's batched segments stand in (one per window; what decides is their
    compression ratio): a looping window, in the middle and at the end, is decoded again over the
    span from the last kept word to the next window, and its pieces come on the chunk's clock."""
    def window(start, end, ratio):
        return SimpleNamespace(start=start, end=end, compression_ratio=ratio)

    spans = []

    def again(start, end):
        spans.append((start, end))
        return [window(1.0, 2.0, 1.0), window(3.0, 4.0, 1.0)]

    windows = [window(0.5, 20.0, 1.5), window(21.0, 45.0, 6.4), window(47.0, 55.0, 1.4), window(56.0, 59.0, 3.0)]
    out = list(loops_decoded_again(windows, again, 60.0))
    assert spans == [(20.0, 47.0), (55.0, 60.0)]
    assert [(piece.start + offset, offset) for piece, offset in out] == [
        (0.5, 0.0), (21.0, 20.0), (23.0, 20.0), (47.0, 0.0), (56.0, 55.0), (58.0, 55.0)]
    assert list(loops_decoded_again([], again, 60.0)) == []


@pytest.mark.parametrize("sound", [
    ["-n", "trim", "0", "60"],  # digital silence
    ["-n", "synth", "60", "whitenoise", "vol", "0.3"],
    ["-n", "synth", "60", "pinknoise", "vol", "0.3"],
    ["-n", "synth", "60", "sine", "440", "vol", "0.3"],
], ids=["silence", "white-noise", "pink-noise", "tone"])
def test_a_minute_without_speech_gives_no_text(client, tmp_path, sound):
    path = tmp_path / "sound.wav"
    subprocess.run(["sox", "-r", "16000", "-c", "1", *sound[:1], str(path), *sound[1:]], check=True,
                   capture_output=True, timeout=60)
    assert transcribe(client, path) == ""
