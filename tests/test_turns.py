"""Live audio's pure parts: cutting it into turns (server VAD, client commits) and resampling."""

from __future__ import annotations

import numpy as np

from dalston.contracts import SESSION_SAMPLE_RATE, TurnDetection
from dalston.pcm import SAMPLE_RATE, from_pcm16, resample, to_pcm16
from dalston.sdk.turns import Turns


def tone(ms: int, level: float = 0.3) -> bytes:
    t = np.arange(SESSION_SAMPLE_RATE * ms // 1000) / SESSION_SAMPLE_RATE
    return to_pcm16(level * np.sin(2 * np.pi * 300 * t))


def quiet(ms: int) -> bytes:
    return bytes(SESSION_SAMPLE_RATE * 2 * ms // 1000)


def feed_in_pieces(turns: Turns, audio: bytes, piece: int = 1234) -> list:
    """Odd-sized pieces, so frames straddle them."""
    return [e for start in range(0, len(audio), piece) for e in turns.feed(audio[start:start + piece])]


def test_server_vad_finds_each_turn_with_its_padding():
    turns = Turns(TurnDetection(prefix_padding_ms=300, silence_duration_ms=500))
    events = feed_in_pieces(turns, quiet(1000) + tone(800) + quiet(700) + tone(400) + quiet(600))
    assert [e.kind for e in events] == ["speech_started", "speech_stopped", "committed"] * 2
    first, second = events[2], events[5]
    assert events[0].item_id == events[1].item_id == first.item_id != second.item_id
    assert events[0].audio_ms == 700  # 1000 ms of quiet, less the 300 ms of padding kept
    assert events[1].audio_ms == 1800
    # Padding, speech, and the silence that ended the turn.
    assert len(first.audio) == len(quiet(300) + tone(800) + quiet(500))
    assert len(second.audio) == len(quiet(200) + tone(400) + quiet(500))


def test_a_pause_shorter_than_the_silence_stays_in_the_turn():
    turns = Turns(TurnDetection(silence_duration_ms=500))
    events = feed_in_pieces(turns, tone(500) + quiet(300) + tone(500) + quiet(500))
    assert [e.kind for e in events] == ["speech_started", "speech_stopped", "committed"]


def test_the_threshold_decides_what_is_speech():
    soft = tone(600, level=0.003) + quiet(600)  # about -53 dBFS
    assert feed_in_pieces(Turns(TurnDetection(threshold=0.5)), soft) == []
    assert len(feed_in_pieces(Turns(TurnDetection(threshold=0.0)), tone(600, level=0.01) + quiet(600))) == 3


def test_without_turn_detection_the_client_commits():
    turns = Turns(None)
    assert turns.commit() is None  # nothing to commit
    assert turns.feed(tone(500) + quiet(2000) + tone(500)) == []
    committed = turns.commit()
    assert committed.kind == "committed" and len(committed.audio) == len(tone(500) + quiet(2000) + tone(500))
    assert turns.commit() is None
    turns.feed(tone(500))
    turns.clear()
    assert turns.commit() is None


def test_resampling_keeps_a_tone_and_the_length():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    signal = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    up = resample(signal, SAMPLE_RATE, SESSION_SAMPLE_RATE)
    assert len(up) == SESSION_SAMPLE_RATE
    back = from_pcm16(to_pcm16(up), SESSION_SAMPLE_RATE)
    assert len(back) == SAMPLE_RATE
    assert np.abs(back[200:-200] - signal[200:-200]).max() < 0.01


def test_resampling_removes_what_the_lower_rate_cannot_hold():
    t = np.arange(SESSION_SAMPLE_RATE) / SESSION_SAMPLE_RATE
    high = (0.5 * np.sin(2 * np.pi * 10_000 * t)).astype(np.float32)  # above 16 kHz's Nyquist
    assert np.abs(resample(high, SESSION_SAMPLE_RATE, SAMPLE_RATE)[200:-200]).max() < 0.05
