"""Live audio's pure parts: cutting real speech into turns (Silero server VAD, client commits), in
noise too, the bounds on what a session holds, and resampling."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from bench.noisy_turns import (CONVERSATIONS, MATCH_S, Turn, cuts_in_speech, load, mixed, pink, speech_frames,
                                turns_of)
from dalston.contracts import SESSION_SAMPLE_RATE, TurnDetection
from dalston.pcm import SAMPLE_RATE, from_pcm16, resample, to_pcm16
from dalston.sdk.turns import FRAME_MS, BufferFull, SpeechProbability, Turns
from tests.audio_fixtures import AUDIO_DIR as AUDIO

SPEAKER1 = AUDIO / "speaker1.wav"  # 24 kHz mono, as a session's audio is
SPEAKER2 = AUDIO / "speaker2.wav"
MAX_MS = 60_000
FRAME_BYTES = SESSION_SAMPLE_RATE * FRAME_MS // 1000 * 2
FRAME_S = FRAME_MS / 1000


def speech(path) -> bytes:
    samples, rate = soundfile.read(path, dtype="int16")
    assert rate == SESSION_SAMPLE_RATE
    return samples.tobytes()


def onset_ms(pcm: bytes) -> tuple[int, int]:
    """Where a clean recording's speech starts and ends: its 10 ms frames above -40 dBFS."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    frames = samples[: len(samples) // 240 * 240].reshape(-1, 240)
    loud = np.flatnonzero(np.sqrt((frames ** 2).mean(axis=1)) > 0.01)
    return int(loud[0]) * 10, int(loud[-1] + 1) * 10


def tone(ms: int, level: float = 0.3) -> bytes:
    t = np.arange(SESSION_SAMPLE_RATE * ms // 1000) / SESSION_SAMPLE_RATE
    return to_pcm16(level * np.sin(2 * np.pi * 300 * t))


def quiet(ms: int) -> bytes:
    return bytes(SESSION_SAMPLE_RATE * 2 * ms // 1000)


def feed_in_pieces(turns: Turns, audio: bytes, piece: int = 1234) -> list:
    """Odd-sized pieces, so frames straddle them."""
    return [e for start in range(0, len(audio), piece) for e in turns.feed(audio[start:start + piece])]


def test_server_vad_finds_each_turn_within_a_few_frames_of_its_speech():
    one, two = speech(SPEAKER1), speech(SPEAKER2)
    turns = Turns(TurnDetection(prefix_padding_ms=300, silence_duration_ms=500), MAX_MS)
    events = feed_in_pieces(turns, quiet(1000) + one + quiet(1000) + two + quiet(1000))
    assert [e.kind for e in events] == ["speech_started", "speech_stopped", "committed"] * 2
    assert events[0].item_id == events[1].item_id == events[2].item_id != events[5].item_id
    for (start, stopped), (offset, clip) in zip([events[0:2], events[3:5]], [(1000, one), (2000 + len(one) * 1000 // (2 * SESSION_SAMPLE_RATE), two)]):
        truth_start, truth_end = (offset + ms for ms in onset_ms(clip))
        # speech_started's audio_start_ms includes the prefix padding, as OpenAI documents it.
        assert abs(start.audio_ms + 300 - truth_start) <= 300, (start.audio_ms, truth_start)
        assert abs(stopped.audio_ms - truth_end) <= 300, (stopped.audio_ms, truth_end)
    committed = events[2]
    assert len(committed.audio) >= len(quiet(300) + quiet(500))  # padding, speech, the closing silence


def test_a_pause_shorter_than_the_silence_stays_in_the_turn():
    turns = Turns(TurnDetection(silence_duration_ms=800), MAX_MS)
    events = feed_in_pieces(turns, speech(SPEAKER1) + quiet(300) + speech(SPEAKER2) + quiet(1000))
    assert [e.kind for e in events] == ["speech_started", "speech_stopped", "committed"]


def test_tones_noise_and_silence_are_not_speech():
    rng = np.random.default_rng(0)
    noise = to_pcm16(0.1 * rng.standard_normal(SESSION_SAMPLE_RATE * 3))
    for audio in (tone(3000), tone(3000, level=0.9), noise, quiet(3000)):
        assert feed_in_pieces(Turns(TurnDetection(), MAX_MS), audio) == []


def test_the_threshold_is_a_speech_probability():
    one = quiet(500) + speech(SPEAKER1) + quiet(1000)
    assert len(feed_in_pieces(Turns(TurnDetection(threshold=0.5), MAX_MS), one)) == 3
    assert feed_in_pieces(Turns(TurnDetection(threshold=1.0), MAX_MS), one) == []


def test_streamed_probabilities_match_one_pass():
    audio = speech(SPEAKER1)[: len(speech(SPEAKER1)) // FRAME_BYTES * FRAME_BYTES]
    whole = SpeechProbability()(audio)
    stream = SpeechProbability()
    pieces = [stream(audio[start:start + 5 * FRAME_BYTES]) for start in range(0, len(audio), 5 * FRAME_BYTES)]
    assert np.abs(np.concatenate(pieces) - whole).max() < 0.1  # the resampler's edges differ, no more


def test_a_held_turn_goes_on_past_its_silence_and_ends_at_the_next():
    turns = Turns(TurnDetection(silence_duration_ms=500), MAX_MS)
    turns.hold = True
    events = feed_in_pieces(turns, speech(SPEAKER1) + quiet(1000))
    assert [e.kind for e in events] == ["speech_started"]
    turns.hold = False
    assert [e.kind for e in turns.feed(quiet(100))] == ["speech_stopped", "committed"]


def test_a_turn_as_long_as_the_buffer_is_committed_and_the_speech_goes_on():
    turns = Turns(TurnDetection(silence_duration_ms=2000), 4000)
    events = feed_in_pieces(turns, speech(SPEAKER1) + speech(SPEAKER2) + quiet(2500))
    kinds = [e.kind for e in events]
    assert kinds == ["speech_started", "speech_stopped", "committed", "speech_started", "speech_stopped",
                     "committed"], kinds
    assert len(events[2].audio) == 4000 * FRAME_BYTES // 32


def test_without_turn_detection_the_client_commits_and_the_buffer_is_bounded():
    turns = Turns(None, 2000)
    assert turns.commit() is None  # nothing to commit
    assert turns.feed(tone(500) + quiet(1000)) == []
    committed = turns.commit()
    assert committed.kind == "committed" and len(committed.audio) == len(tone(500) + quiet(1000))
    assert turns.commit() is None
    turns.feed(tone(500))
    turns.clear()
    assert turns.commit() is None
    turns.feed(quiet(1500))
    with pytest.raises(BufferFull):
        turns.feed(quiet(600))


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


def test_a_16_khz_session_finds_the_same_turn_where_it_is():
    audio = speech(SPEAKER1)
    at_16k = to_pcm16(resample(np.frombuffer(audio, "<i2").astype(np.float32) / 32768, SESSION_SAMPLE_RATE, 16_000))
    found = {}
    for rate, pcm in ((SESSION_SAMPLE_RATE, audio), (16_000, at_16k)):
        turns = Turns(TurnDetection(silence_duration_ms=500), MAX_MS, rate)
        turns.feed(bytes(rate * 2))  # a second of silence first
        events = feed_in_pieces(turns, pcm + bytes(rate * 2))
        assert [e.kind for e in events] == ["speech_started", "speech_stopped", "committed"]
        committed = events[2]
        assert committed.start_ms + turns.ms(len(committed.audio)) == committed.audio_ms
        found[rate] = (events[0].audio_ms, events[1].audio_ms, committed.start_ms)
    assert all(abs(a - b) <= 2 * FRAME_MS for a, b in zip(found[SESSION_SAMPLE_RATE], found[16_000])), found


def test_speech_shorter_than_min_speech_starts_no_turn():
    clip = speech(SPEAKER1)
    assert feed_in_pieces(Turns(TurnDetection(min_speech_ms=2000), MAX_MS), clip + quiet(1000)) == []


def test_pink_noise_10_db_down_keeps_the_turns_of_read_speech():
    """Three people reading a sentence each, with pauses (tests/data/conversations/read_3spk),
    with pink noise at 10 dB SNR: the clean run's three turns, none cut in speech."""
    clip = load(CONVERSATIONS / "read_3spk.flac")
    clean, speech = turns_of(clip), speech_frames(clip)
    assert len(clean) == 3 and cuts_in_speech(clean, speech) == []
    for seed in range(2):
        noisy = turns_of(mixed(clip, pink(len(clip), np.random.default_rng(seed)))[0])
        assert len(noisy) == 3, [(t.start, t.stop) for t in noisy]
        assert all(abs(n.start - c.start) <= MATCH_S and abs(n.stop - c.stop) <= MATCH_S for n, c in zip(noisy, clean))
        # The noise hides a sentence's quiet end, so speech_stopped comes early, but the commit
        # silence_duration_ms later still holds it: no word is cut.
        assert cuts_in_speech(noisy, speech) == []


def test_a_turn_boundary_in_speech_is_a_cut_and_one_in_a_pause_is_not():
    clip = load(CONVERSATIONS / "read_3spk.flac")
    speech = speech_frames(clip)
    first, second = Turn(1.8, 3.8, (1.5, 4.3)), Turn(6.3, 11.1, (6.0, 11.6))  # the pause between: 3.9-6.2 s
    assert cuts_in_speech([first, second], speech) == []
    inside = (np.flatnonzero(speech[int(8 / FRAME_S):])[0] + int(8 / FRAME_S) + 1) * FRAME_S  # in the second sentence
    split = [Turn(6.3, inside, (6.0, inside)), Turn(inside, 11.1, (inside, 11.6))]
    assert len(cuts_in_speech([first] + split, speech)) == 1
