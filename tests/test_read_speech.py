"""The default path on what tends to go wrong: long read speech between regular pauses (the same
transcript every run, no invented text), and sound without speech (no text at all), through a real
Dalston, whose faster-whisper engines decode in batches by default."""

from __future__ import annotations

import subprocess

import openai
import pytest

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
