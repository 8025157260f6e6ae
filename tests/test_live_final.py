"""A live turn's final decodes all its audio after the words its partials agreed on while the
turn fits in one Whisper window, and only the audio after the settled words past it: the
session's choice, in process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dalston.contracts import ChannelTranscript, Segment, SessionConfig, SessionRequest, Word
from dalston.sdk.sessions import WINDOW_MS, LiveSession, Settled

RATE = 16_000


class Recorder:
    """An actor that records what each decode was given."""

    def __init__(self):
        self.calls = []

    def transcribe(self, handle, audio, options, cancelled, on_segment):
        self.calls.append((len(audio), options))
        later = Word(start=0.0, end=1.0, word=" later")
        return ChannelTranscript(segments=[Segment(start=0.0, end=1.0, text=" later", words=[later])],
                                 language="en")


def _session(actor: Recorder) -> LiveSession:
    host = SimpleNamespace(_bus=None, identity="test", engine="test", actor=actor,
                           settings=SimpleNamespace(max_session_buffer_seconds=600))
    request = SessionRequest(id="s1", model="m", runtime="r", runtime_model_id="m",
                             config=SessionConfig(sample_rate=RATE))
    session = LiveSession(host, request)
    session._handle = object()
    return session


def _pcm(ms: int) -> bytes:
    return bytes(2 * RATE * ms // 1000)


@pytest.mark.parametrize("draft", [False, True], ids=["final", "partial"])
async def test_a_turn_within_a_window_is_decoded_whole_by_its_final(draft):
    actor = Recorder()
    session = _session(actor)
    session._agreed = ("turn", ["earlier", "agreed"])
    session._settled = Settled("turn", len(_pcm(6_000)), [Word(start=0.0, end=5.0, word=" earlier")])
    said = await session._decode(_pcm(20_000), "turn", draft=draft)
    (samples, options), = actor.calls
    if draft:  # a partial takes the tail, after the settled words, which are its prompt
        assert samples == 14 * RATE and options.prompt == "earlier" and options.prefix == "agreed"
        assert [s.text for s in said] == ["earlier", " later"]
    else:  # the final hears it all, from every agreed word on
        assert samples == 20 * RATE and options.prompt is None and options.prefix == "earlier agreed"
        assert [s.text for s in said] == [" later"]


async def test_a_turn_past_a_window_is_decoded_by_its_final_after_its_settled_words():
    actor = Recorder()
    session = _session(actor)
    session._agreed = ("turn", ["earlier", "agreed"])
    session._settled = Settled("turn", len(_pcm(6_000)), [Word(start=0.0, end=5.0, word=" earlier")])
    said = await session._decode(_pcm(WINDOW_MS + 7_000), "turn")
    (samples, options), = actor.calls
    # Its tail is still over a window long: the prefix would lead only its first window.
    assert samples == (WINDOW_MS + 1_000) * RATE // 1000 and options.prompt == "earlier" and options.prefix is None
    assert said[0].text == "earlier" and said[1].start == pytest.approx(6.0)


@pytest.mark.parametrize(("silence_ms", "drafted"), [(0, "partial"), (96, None), (192, "final")])
async def test_no_partial_starts_once_the_speech_has_paused(silence_ms, drafted):
    # A partial started in the pause would hold up the turn's final, due at min_silence_ms (192).
    session = _session(Recorder())
    speech = len(_pcm(2_000))
    audio = _pcm(2_000 + silence_ms)
    session._turns = SimpleNamespace(turn=("turn", len(audio), speech), turn_audio=lambda: audio)
    session._draft_turn()
    draft = session._draft
    assert (None if draft is None else "final" if draft.final else "partial") == drafted
    if draft is not None:
        await draft.task
