"""`dalston transcribe --stream` and `dalston listen` as a user runs them: real subprocesses against
the shared real stack."""

from __future__ import annotations

import subprocess
import sys

from tests.audio_fixtures import convert, speak
from tests.stack import AUDIO, DIALOGUE_WORDS, TestStack, words

MODEL = "faster-whisper-tiny.en"


def dalston(stack: TestStack, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dalston", *args], capture_output=True, input=stdin,
                          timeout=120, env={**stack.env, "DALSTON_SERVER": stack.url})


def test_transcribe_stream_prints_the_text(stack):
    done = dalston(stack, "transcribe", "--stream", str(AUDIO / "dialogue.wav"), "-m", MODEL)
    assert done.returncode == 0, done.stderr
    assert words(done.stdout.decode()) == DIALOGUE_WORDS


def test_transcribe_stream_names_a_bad_file(stack):
    done = dalston(stack, "transcribe", "--stream", str(AUDIO / "invalid" / "text_as_wav.wav"), "-m", MODEL)
    assert done.returncode == 1
    assert "text, not audio" in done.stderr.decode()


def test_listen_to_a_file(stack):
    done = dalston(stack, "listen", str(AUDIO / "speaker1.wav"), "-m", MODEL)
    assert done.returncode == 0, done.stderr
    assert words(done.stdout.decode()) == words("That was hilarious, I can't believe you said that.")


def test_listen_to_raw_pcm_on_stdin_prints_a_line_per_turn(stack, tmp_path):
    sentences = ["The weather today is sunny with a light breeze from the west.",
                 "Please call your sister before dinner on Sunday evening."]
    pcm = [convert(speak(s, "en-us", tmp_path), ".raw", tmp_path, rate=24000, channels=1,
                   args=("-f", "s16le")).read_bytes() for s in sentences]
    done = dalston(stack, "listen", "-m", MODEL, stdin=pcm[0] + bytes(48000) + pcm[1])
    assert done.returncode == 0, done.stderr
    assert [words(line) for line in done.stdout.decode().splitlines()] == [words(s) for s in sentences]
