"""Speaker assignment (dalston.speakers), the diarize options' contract, and the clustering and
smoothing of the GE2E diarizer (actors.diarize.clustering): pure, no model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actors.diarize.clustering import Piece, absorb_islands, best_split, cluster, join
from dalston.contracts import (
    ContractError,
    DiarizeOptions,
    JobRequest,
    Segment,
    SpeakerTurn,
    TranscribeOptions,
    Word,
    convert,
    decode,
)
from dalston.speakers import assign_speakers, labelled_turns

TURNS = [SpeakerTurn(start=0.0, end=2.5, speaker="SPEAKER_0"),
         SpeakerTurn(start=2.9, end=5.6, speaker="SPEAKER_1")]


def _words(*spans: tuple[float, float, str]) -> list[Word]:
    return [Word(start=s, end=e, word=w) for s, e, w in spans]


def test_a_segment_is_split_where_its_words_change_speaker():
    segment = Segment(id=7, start=0.0, end=5.5, text="Said that. What do", tokens=[1, 2, 3], avg_logprob=-0.3,
                      words=_words((1.9, 2.2, " Said"), (2.2, 2.6, " that."), (2.95, 3.2, " What"),
                                   (3.2, 3.4, " do")))
    first, second = assign_speakers([segment], TURNS)
    assert (first.id, first.speaker, first.text, first.start, first.end) == (0, "SPEAKER_0", "Said that.", 0.0, 2.6)
    assert (second.id, second.speaker, second.text, second.start, second.end) == (1, "SPEAKER_1", "What do", 2.95, 5.5)
    assert [w.speaker for w in first.words + second.words] == ["SPEAKER_0"] * 2 + ["SPEAKER_1"] * 2
    # Tokens cannot be cut between words; what is per segment stays.
    assert first.tokens == second.tokens == [] and first.avg_logprob == second.avg_logprob == -0.3


def test_a_word_goes_to_the_turn_it_overlaps_most_and_between_turns_to_the_nearest():
    # " that." overlaps SPEAKER_0 by 0.3 s and nothing else; " um" lies in the pause, nearer SPEAKER_1.
    segment = Segment(start=2.2, end=3.3, text="that. um yes",
                      words=_words((2.2, 2.8, " that."), (2.75, 2.85, " um"), (2.85, 3.3, " yes")))
    assert [w.speaker for s in assign_speakers([segment], TURNS) for w in s.words] == [
        "SPEAKER_0", "SPEAKER_1", "SPEAKER_1"]


def test_one_speaker_segments_keep_their_tokens_and_words_without_spaces_are_joined_with_them():
    whole = Segment(start=0.0, end=2.0, text="That was", tokens=[5], words=_words((0.0, 1.0, "That"), (1.0, 2.0, "was")))
    nemo = Segment(start=2.0, end=3.5, text="fun What",
                   words=_words((2.0, 2.4, "fun"), (3.0, 3.5, "What")))
    kept, *split = assign_speakers([whole, nemo], TURNS)
    assert (kept.speaker, kept.tokens, kept.text) == ("SPEAKER_0", [5], "That was")
    assert [(s.text, s.speaker, s.id) for s in split] == [("fun", "SPEAKER_0", 1), ("What", "SPEAKER_1", 2)]


def test_segments_without_words_take_the_speaker_of_most_of_their_time_and_no_turns_change_nothing():
    segments = [Segment(start=2.0, end=4.0, text="across"), Segment(start=0.0, end=1.0, text="early")]
    assert [s.speaker for s in assign_speakers(segments, TURNS)] == ["SPEAKER_1", "SPEAKER_0"]
    assert assign_speakers(segments, []) == segments


def test_speakers_are_labelled_in_the_order_they_first_talk():
    speakers, turns = labelled_turns([(0.0, 1.0, "B"), (1.2, 2.0001, "A"), (2.5, 3.0, "B")])
    assert speakers == ["SPEAKER_0", "SPEAKER_1"]
    assert [(t.start, t.end, t.speaker) for t in turns] == [
        (0.0, 1.0, "SPEAKER_0"), (1.2, 2.0, "SPEAKER_1"), (2.5, 3.0, "SPEAKER_0")]


@pytest.mark.parametrize("options, field", [
    ({"num_speakers": 0}, "num_speakers"), ({"num_speakers": 33}, "num_speakers"),
    ({"min_speakers": 3, "max_speakers": 2}, "min_speakers (3) is more than max_speakers (2)"),
    ({"num_speakers": 5, "max_speakers": 4}, "num_speakers (5) is outside"),
])
def test_diarize_options_are_checked_where_they_are_decoded(options, field):
    request = {"id": "job1", "options": {"diarize": options}}
    with pytest.raises(ContractError, match=field.replace("(", r"\(").replace(")", r"\)")):
        convert(request, JobRequest)
    with pytest.raises(ContractError):
        decode(json.dumps({"diarize": options}).encode(), TranscribeOptions)


def test_diarize_options_bounds():
    assert DiarizeOptions().bounds == (1, 32)
    assert DiarizeOptions(num_speakers=3).bounds == (3, 3)
    assert DiarizeOptions(min_speakers=2).bounds == (2, 32)
    assert convert({"id": "j", "options": {"diarize": {"max_speakers": 4}}}, JobRequest).options.diarize.bounds == (1, 4)
    assert TranscribeOptions().diarize is None


# --- clustering and smoothing --------------------------------------------------------------------


def _voices(rng, count: int, dims: int = 16) -> np.ndarray:
    voices = rng.normal(size=(count, dims))
    return voices / np.linalg.norm(voices, axis=1, keepdims=True)


def _noisy(rng, voice: np.ndarray, spread: float) -> np.ndarray:
    return voice + rng.normal(scale=spread, size=voice.shape)


def test_clustering_counts_speakers_by_threshold_and_obeys_a_given_count():
    rng = np.random.default_rng(0)
    voices = _voices(rng, 3)
    truth = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    embeddings = np.array([_noisy(rng, voices[v], 0.03) for v in truth])
    weights = np.ones(len(truth))
    reliable = np.ones(len(truth), dtype=bool)
    found = cluster(embeddings, weights, reliable, threshold=0.8)
    assert len(found.centroids) == 3 and _same_partition(found.labels, truth)
    assert len(cluster(embeddings, weights, reliable, threshold=0.8, bounds=(2, 2)).centroids) == 2
    assert len(cluster(embeddings, weights, reliable, threshold=0.8, bounds=(1, 1)).centroids) == 1
    assert len(cluster(embeddings, weights, reliable, threshold=0.8, bounds=(4, 32)).centroids) == 4
    # Past what there is to split, there is one speaker per piece.
    assert len(cluster(embeddings[:2], weights[:2], reliable[:2], threshold=0.8, bounds=(5, 5)).centroids) == 2


def test_unreliable_pieces_are_not_clustered_but_join_the_nearest_speaker():
    rng = np.random.default_rng(1)
    voices = _voices(rng, 2)
    truth = np.array([0, 1, 0, 1, 0])
    embeddings = np.array([_noisy(rng, voices[v], 0.03) for v in truth])
    # A short piece: its embedding is half-way to the other voice; alone it would be a speaker.
    embeddings[4] = voices[0] * 0.6 + voices[1] * 0.4
    reliable = np.array([True, True, True, True, False])
    found = cluster(embeddings, np.ones(5), reliable, threshold=0.9)
    assert len(cluster(embeddings, np.ones(5), np.ones(5, bool), threshold=0.9).centroids) == 3
    assert _same_partition(found.labels[:4], truth[:4]) and found.labels[4] == found.labels[0]


def test_clustering_of_nothing_and_of_one_piece():
    assert cluster(np.zeros((0, 4)), np.zeros(0), np.zeros(0, bool), threshold=0.8).labels.tolist() == []
    one = cluster(np.ones((1, 4)), np.ones(1), np.zeros(1, bool), threshold=0.8)
    assert one.labels.tolist() == [0] and one.centroids.shape == (1, 4)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def test_best_split_finds_where_the_margin_changes_sign():
    times = np.arange(10) * 0.25 + 1.0
    margins = np.array([0.1, 0.2, 0.05, 0.15, -0.02, 0.1, -0.2, -0.1, -0.15, -0.3])
    # Window 4 dips, but the cut that leaves most margin on each side is before window 6.
    assert best_split(times, margins) == pytest.approx((times[5] + times[6]) / 2)
    assert best_split(times[:1], margins[:1]) is None


def test_an_instant_of_another_voice_between_two_of_one_is_theirs():
    pieces = [Piece(0.0, 3.0, 0), Piece(3.2, 3.8, 1), Piece(4.0, 7.0, 2), Piece(9.0, 9.5, 3)]
    assert absorb_islands(pieces, [0, 1, 0, 1], bridge=1.0, min_turn=1.0) == [0, 0, 0, 1]
    # Long enough to be a turn, or too far from its neighbours: kept.
    assert absorb_islands(pieces, [0, 1, 0, 1], bridge=0.1, min_turn=1.0) == [0, 1, 0, 1]
    longer = [Piece(0.0, 3.0, 0), Piece(3.2, 4.5, 1), Piece(4.6, 7.0, 2)]
    assert absorb_islands(longer, [0, 1, 0], bridge=1.0, min_turn=1.0) == [0, 1, 0]


def test_pieces_of_one_speaker_close_together_are_one_turn():
    pieces = [Piece(0.0, 2.0, 0), Piece(2.5, 4.0, 1), Piece(6.0, 7.0, 2), Piece(7.1, 8.0, 3)]
    assert join(pieces, [0, 0, 0, 1], bridge=1.0) == [(0.0, 4.0, 0), (6.0, 7.0, 0), (7.1, 8.0, 1)]


def test_a_given_count_is_not_spent_on_a_stray_piece():
    rng = np.random.default_rng(2)
    voices = _voices(rng, 2)
    truth = np.array([0, 1] * 5)
    stray = -(voices[0] + voices[1])  # unlike either voice: the tree's last split puts it alone
    embeddings = np.array([_noisy(rng, voices[v], 0.03) for v in truth] + [stray])
    weights = np.array([3.0] * 10 + [1.0])
    found = cluster(embeddings, weights, np.ones(11, bool), threshold=0.8, min_share=0.12, bounds=(2, 2))
    assert len(found.centroids) == 2 and _same_partition(found.labels[:10], truth)
    # Without the share rule, a cut at two is the stray piece against both voices.
    plain = cluster(embeddings, weights, np.ones(11, bool), threshold=0.8, bounds=(2, 2))
    assert not _same_partition(plain.labels[:10], truth)
