"""The redaction rules (dalston.redaction): what is masked, and the ordinary numbers that are
kept. Pure, milliseconds."""

from __future__ import annotations

import pytest

from dalston.contracts import Segment, Transcript, Word
from dalston.redaction import luhn, redact, redact_text


@pytest.mark.parametrize(("said", "masked"), [
    ("Call me on 555-123-4567 please.", "Call me on [REDACTED] please."),
    ("call me on (555) 123 4567", "call me on [REDACTED]"),
    ("my number is +44 20 7946 0958.", "my number is [REDACTED]."),
    ("oh seven nine four six oh nine five eight seven two", "[REDACTED]"),
    ("the card is 4111 1111 1111 1111, expiring soon", "the card is [REDACTED], expiring soon"),
    ("card 4111111111111111 ok", "card [REDACTED] ok"),
    ("my pin is four five six seven.", "my pin is [REDACTED]."),
    ("my PIN is 4, 5, 6, 7.", "my PIN is [REDACTED]."),
    ("Write to ann.lee@example.com today", "Write to [REDACTED] today"),
    ("write to ann at example dot co dot uk today", "write to [REDACTED] today"),
])
def test_personal_data_is_masked(said, masked):
    assert redact_text(said) == masked


@pytest.mark.parametrize("said", [
    "we met in 2019 with three people",
    "it cost 1,500,000 dollars, or 3.14159 each",
    "in 2019, 2020, 2021 and 2022",
    "chapter 12 page 345",
    "one two three",  # counting, fewer than four digits one by one
    "4111 1111 1111 1112 fails the Luhn check",
    "meet me at the station at noon",
    "oh I see, one moment",
])
def test_ordinary_words_and_numbers_are_kept(said):
    assert redact_text(said) == said


def test_luhn():
    assert luhn("4111111111111111") and luhn("79927398713")
    assert not luhn("4111111111111112") and not luhn("79927398710")


def test_words_keep_their_times_and_the_transcript_masks_throughout():
    said = " my pin is four five six seven thanks".split(" ")[1:]
    words = [Word(start=t, end=t + 0.4, word=f" {w}", speaker="A") for t, w in enumerate(said)]
    text = "".join(w.word for w in words)
    transcript = redact(Transcript(job_id="j", text=text, segments=[Segment(start=0, end=7, text=text, words=words)]))
    assert transcript.text == transcript.segments[0].text == " my pin is [REDACTED] thanks"
    out = transcript.segments[0].words
    assert [w.word for w in out] == [" my", " pin", " is", *[" [REDACTED]"] * 4, " thanks"]
    assert [(w.start, w.end, w.speaker) for w in out] == [(w.start, w.end, w.speaker) for w in words]


def test_a_number_split_into_words_as_whisper_splits_it_is_masked_whole():
    said = ["Please", " call", " me", " on", " 555", "-234", "-5678.", " Thank", " you."]
    words = redact(Transcript(job_id="j", text="", segments=[Segment(start=0, end=9, text="", words=[
        Word(start=t, end=t + 1, word=w) for t, w in enumerate(said)])])).segments[0].words
    assert [w.word for w in words] == ["Please", " call", " me", " on", " [REDACTED]", "[REDACTED]", "[REDACTED].",
                                       " Thank", " you."]
