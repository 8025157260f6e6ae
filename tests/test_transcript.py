"""dalston.transcript: merging channels and every OpenAI response format."""

from __future__ import annotations

import json

import pytest
from openai.types.audio import Transcription, TranscriptionVerbose, TranslationVerbose

from dalston.contracts import ChannelTranscript, Segment, Transcript, Word
from dalston.transcript import FORMATS, merge, render


def _segment(start: float, end: float, text: str, **fields) -> Segment:
    return Segment(start=start, end=end, text=text, **fields)


def _two_channels() -> list[ChannelTranscript]:
    # Given out of channel order, to show merge does not depend on it.
    return [
        ChannelTranscript(channel=1, language="en", duration=6.1, segments=[
            _segment(2.5, 5.0, " What do you mean?",
                     words=[Word(start=2.5, end=2.8, word=" What"),
                            Word(start=2.8, end=3.0, word=" do")]),
        ]),
        ChannelTranscript(channel=0, language="en", duration=6.0, segments=[
            _segment(0.0, 2.4, " That was hilarious.", avg_logprob=-0.2, tokens=[1, 2],
                     words=[Word(start=0.0, end=0.4, word=" That")]),
            _segment(5.0, 6.0, " Really?"),
        ]),
    ]


@pytest.fixture
def stereo() -> Transcript:
    return merge("job1", "whisper-tiny", _two_channels())


def test_merge_interleaves_channels_by_time(stereo):
    assert [(s.id, s.start, s.channel) for s in stereo.segments] == [
        (0, 0.0, 0), (1, 2.5, 1), (2, 5.0, 0)]
    assert stereo.text == "That was hilarious. What do you mean? Really?"
    assert (stereo.job_id, stereo.model, stereo.channels) == ("job1", "whisper-tiny", 2)
    assert stereo.language == "en" and stereo.duration == 6.1


def test_merge_single_channel_has_no_channel_tags():
    part = _two_channels()[1]
    transcript = merge("job2", "m", [part])
    assert transcript.channels == 1
    assert all(s.channel is None for s in transcript.segments)
    assert [s.id for s in transcript.segments] == [0, 1]


def test_merge_ties_keep_channel_order_and_most_common_language():
    parts = [ChannelTranscript(channel=c, language=lang, segments=[_segment(1.0, 2.0, f"c{c}")])
             for c, lang in [(2, "de"), (0, "fr"), (1, "de")]]
    transcript = merge("job3", "m", parts)
    assert [s.channel for s in transcript.segments] == [0, 1, 2]
    assert transcript.language == "de"


def test_json_is_openai_transcription(stereo):
    body, media_type = render(stereo, "json")
    assert media_type == "application/json"
    assert json.loads(body) == {"text": stereo.text, "usage": {"type": "duration", "seconds": 7}}
    parsed = Transcription.model_validate_json(body)
    assert parsed.text == stereo.text and parsed.usage.seconds == 7


def test_text(stereo):
    assert render(stereo, "text") == (stereo.text + "\n", "text/plain; charset=utf-8")


def test_verbose_json_is_openai_transcription_verbose(stereo):
    body, _ = render(stereo, "verbose_json", words=True)
    verbose = TranscriptionVerbose.model_validate_json(body)
    assert (verbose.language, verbose.duration, verbose.text) == ("english", 6.1, stereo.text)
    assert [s.id for s in verbose.segments] == [0, 1, 2]
    first = verbose.segments[0]
    assert (first.start, first.end, first.text, first.tokens, first.avg_logprob) == (
        0.0, 2.4, " That was hilarious.", [1, 2], -0.2)
    assert [(w.word, w.start) for w in verbose.words] == [("That", 0.0), ("What", 2.5), ("do", 2.8)]
    assert json.loads(body)["task"] == "transcribe"
    assert verbose.usage.type == "duration" and verbose.usage.seconds == 7


def test_a_translation_is_english_whatever_was_spoken():
    german = merge("j", "m", [ChannelTranscript(language="de", duration=2.0,
                                                segments=[_segment(0.0, 2.0, "Good morning.")])])
    verbose = TranslationVerbose.model_validate_json(render(german, "verbose_json", task="translate")[0])
    assert (verbose.language, verbose.text) == ("english", "Good morning.")
    assert json.loads(render(german, "verbose_json")[0])["language"] == "german"


def test_logprobs_where_the_engine_reported_them():
    transcript = merge("j", "m", [ChannelTranscript(duration=1.0, segments=[_segment(0.0, 1.0, "Hi you", words=[
        Word(start=0.0, end=0.5, word=" Hi", probability=0.5, logprob=-0.6931),
        Word(start=0.5, end=1.0, word=" you", probability=0.9, logprob=-0.1054)])])])
    for fmt in ("json", "verbose_json"):
        body = json.loads(render(transcript, fmt, logprobs=True)[0])
        assert body["logprobs"] == [{"token": " Hi", "logprob": -0.6931, "bytes": list(b" Hi")},
                                    {"token": " you", "logprob": -0.1054, "bytes": list(b" you")}]
        assert "logprobs" not in json.loads(render(transcript, fmt)[0])
    # An engine without log-probabilities (NeMo): none are made up.
    assert "logprobs" not in json.loads(render(merge("j", "m", _two_channels()), "json", logprobs=True)[0])


def test_verbose_json_granularities(stereo):
    plain = json.loads(render(stereo, "verbose_json")[0])
    assert "segments" in plain and "words" not in plain
    words_only = json.loads(render(stereo, "verbose_json", words=True, segments=False)[0])
    assert "segments" not in words_only and len(words_only["words"]) == 3


def test_srt_and_vtt_timestamps():
    transcript = Transcript(job_id="j", text="Late. Later.", segments=[
        _segment(3661.5, 3662.0015, " Late."), _segment(0.25, 1.0, "  "),
        _segment(36000.0, 36001.999, "Later.")])
    srt, srt_type = render(transcript, "srt")
    assert srt == ("1\n01:01:01,500 --> 01:01:02,002\nLate.\n\n"
                   "2\n10:00:00,000 --> 10:00:01,999\nLater.\n\n")
    assert srt_type.startswith("application/x-subrip")
    vtt, vtt_type = render(transcript, "vtt")
    assert vtt == ("WEBVTT\n\n01:01:01.500 --> 01:01:02.002\nLate.\n\n"
                   "10:00:00.000 --> 10:00:01.999\nLater.\n\n")
    assert vtt_type.startswith("text/vtt")


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_transcript_renders(fmt):
    empty = merge("j", "m", [ChannelTranscript(duration=3.0)])
    body, media_type = render(empty, fmt, words=True)
    assert media_type == FORMATS[fmt]
    if fmt == "json":
        Transcription.model_validate_json(body)
    elif fmt == "verbose_json":
        verbose = TranscriptionVerbose.model_validate_json(body)
        assert verbose.segments == [] and verbose.words == [] and verbose.duration == 3.0
    elif fmt == "diarized_json":
        assert json.loads(body)["segments"] == []
    else:
        assert body == {"text": "\n", "srt": "", "vtt": "WEBVTT\n\n"}[fmt]


def test_unknown_format_lists_valid_ones(stereo):
    with pytest.raises(ValueError, match="verbose_json") as caught:
        render(stereo, "docx")
    assert "'docx'" in str(caught.value)


# --- speakers ----------------------------------------------------------------------------------


@pytest.fixture
def diarized() -> Transcript:
    return Transcript(job_id="j", text="That was hilarious. What do you mean? Really serious.", duration=5.6,
                      language="en", segments=[
                          _segment(0.0, 2.4, " That was hilarious.", id=0, speaker="SPEAKER_0",
                                   words=[Word(start=0.0, end=0.4, word=" That", speaker="SPEAKER_0")]),
                          _segment(2.9, 3.7, " What do you mean?", id=1, speaker="SPEAKER_1"),
                          _segment(3.9, 5.6, " Really serious.", id=2, speaker="SPEAKER_1")])


def test_diarized_json_is_openai_transcription_diarized(diarized):
    from openai.types.audio import TranscriptionDiarized

    body, media_type = render(diarized, "diarized_json")
    result = TranscriptionDiarized.model_validate_json(body)
    assert media_type == "application/json" and result.text == diarized.text and result.duration == 5.6
    assert [(s.id, s.speaker, s.text, s.start, s.end, s.type) for s in result.segments] == [
        ("seg_0", "SPEAKER_0", "That was hilarious.", 0.0, 2.4, "transcript.text.segment"),
        ("seg_1", "SPEAKER_1", "What do you mean?", 2.9, 3.7, "transcript.text.segment"),
        ("seg_2", "SPEAKER_1", "Really serious.", 3.9, 5.6, "transcript.text.segment")]
    assert json.loads(body)["usage"] == {"type": "duration", "seconds": 5.6}


def test_diarized_json_without_speakers_says_unknown(stereo):
    result = json.loads(render(stereo, "diarized_json")[0])
    assert {s["speaker"] for s in result["segments"]} == {"unknown"}


def test_verbose_json_words_and_segments_carry_speakers(diarized, stereo):
    body, _ = render(diarized, "verbose_json", words=True)
    TranscriptionVerbose.model_validate_json(body)
    result = json.loads(body)
    assert [s["speaker"] for s in result["segments"]] == ["SPEAKER_0", "SPEAKER_1", "SPEAKER_1"]
    assert result["words"] == [{"word": "That", "start": 0.0, "end": 0.4, "speaker": "SPEAKER_0"}]
    plain = json.loads(render(stereo, "verbose_json", words=True)[0])
    assert all("speaker" not in item for item in plain["segments"] + plain["words"])


def test_subtitles_and_text_name_the_speaker(diarized):
    vtt, _ = render(diarized, "vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.400\n<v SPEAKER_0>That was hilarious.\n\n"
                          "00:00:02.900 --> 00:00:03.700\n<v SPEAKER_1>What do you mean?\n\n")
    srt, _ = render(diarized, "srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:02,400\nSPEAKER_0: That was hilarious.\n\n")
    # Consecutive segments of one speaker are one line of text.
    assert render(diarized, "text")[0] == (
        "SPEAKER_0: That was hilarious.\nSPEAKER_1: What do you mean? Really serious.\n")


def test_long_segments_are_split_into_cues_of_two_lines_of_at_most_42_characters():
    said = ("The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background. "
            "It's easy to tell the depth of a well.").split()
    words = [Word(start=n * 0.3, end=n * 0.3 + 0.25, word=f" {w}") for n, w in enumerate(said)]
    timed = _segment(0.0, words[-1].end, " ".join(said), words=words, speaker="SPEAKER_0")
    untimed = _segment(20.0, 30.0, "A rod is used to catch pink salmon and the source of the huge "
                                   "river is the clear spring.")
    transcript = Transcript(job_id="j", text="", segments=[timed, untimed])
    srt = render(transcript, "srt")[0].split("\n\n")[:-1]
    cues = [cue.split("\n", 2) for cue in srt]
    lines = [line for _, _, text in cues for line in text.split("\n")]
    assert all(len(line) <= 42 for line in lines) and all(len(text.split("\n")) <= 2 for *_, text in cues)
    # Every word once, in order; the speaker leads the first line of each of its cues.
    shown = " ".join(lines).replace("SPEAKER_0: ", "").split()
    assert shown == said + untimed.text.split()
    assert [text.startswith("SPEAKER_0: ") for *_, text in cues] == [True, True, False, False]
    # A cue runs from its first word's start to its last word's end; untimed text shares its time.
    assert cues[0][1] == "00:00:00,000 --> 00:00:04,150" and cues[1][1].startswith("00:00:04,200 --> ")
    assert cues[2][1].startswith("00:00:20,000 --> ") and cues[3][1].endswith(" --> 00:00:30,000")
    vtt = render(transcript, "vtt")[0]
    assert vtt.count("<v SPEAKER_0>") == 2 and all(len(line) <= 42 for line in
                                                    vtt.replace("<v SPEAKER_0>", "").split("\n"))
