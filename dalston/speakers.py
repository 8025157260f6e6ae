"""Who spoke what: speaker labels, and a diarization's turns laid onto a transcript.

Each word gets the speaker whose turn overlaps it most (a word between turns, the nearest
turn's); a segment is split where the speaker of its words changes. Pure: contracts in,
contracts out.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence

import msgspec

from dalston.contracts import Segment, SpeakerTurn, Word
from dalston.sentences import joined


def speaker_label(number: int) -> str:
    """The label of the `number`-th speaker to talk (from 0)."""
    return f"SPEAKER_{number}"


def labelled_turns(turns: Sequence[tuple[float, float, Hashable]]) -> tuple[list[str], list[SpeakerTurn]]:
    """Turns (start, end, any speaker key) in time order as `SpeakerTurn`s, speakers labelled
    in the order they first talk; and those labels."""
    labels: dict[Hashable, str] = {}
    for _, _, key in turns:
        labels.setdefault(key, speaker_label(len(labels)))
    return list(labels.values()), [SpeakerTurn(start=round(float(start), 3), end=round(float(end), 3),
                                               speaker=labels[key]) for start, end, key in turns]


def assign_speakers(segments: Sequence[Segment], turns: Sequence[SpeakerTurn]) -> list[Segment]:
    """`segments` with `speaker` set on every word and segment, split where it changes, and
    numbered afresh. Without turns nothing is assigned."""
    if not turns:
        return list(segments)
    timeline = _Timeline(turns)
    result: list[Segment] = []
    for segment in segments:
        if not segment.words:
            result.append(msgspec.structs.replace(segment, speaker=timeline.speaker(segment.start, segment.end)))
            continue
        words = [msgspec.structs.replace(w, speaker=timeline.speaker(w.start, w.end)) for w in segment.words]
        result += _split(segment, words)
    return [msgspec.structs.replace(segment, id=number) for number, segment in enumerate(result)]


def _split(segment: Segment, words: list[Word]) -> list[Segment]:
    """`segment` cut into runs of consecutive words of one speaker."""
    runs: list[list[Word]] = []
    for word in words:
        if runs and runs[-1][-1].speaker == word.speaker:
            runs[-1].append(word)
        else:
            runs.append([word])
    if len(runs) == 1:
        return [msgspec.structs.replace(segment, words=words, speaker=words[0].speaker)]
    return [
        msgspec.structs.replace(
            segment, words=run, speaker=run[0].speaker, text=joined(run),
            # The first and last pieces keep the segment's outer edges.
            start=segment.start if n == 0 else run[0].start,
            end=segment.end if n == len(runs) - 1 else run[-1].end,
            # Tokens cannot be apportioned to words; a piece has none.
            tokens=[])
        for n, run in enumerate(runs)
    ]


class _Timeline:
    """Turns sorted by time, for finding who speaks in a span quickly."""

    def __init__(self, turns: Sequence[SpeakerTurn]) -> None:
        self.turns = sorted(turns, key=lambda t: t.start)
        self.starts = [t.start for t in self.turns]
        # The latest end so far: turns may overlap, so ends alone need not be sorted.
        self.reach = []
        latest = float("-inf")
        for turn in self.turns:
            latest = max(latest, turn.end)
            self.reach.append(latest)

    def speaker(self, start: float, end: float) -> str:
        """The speaker whose turns overlap [start, end] most; the nearest turn's if none do."""
        first = bisect.bisect_left(self.reach, start)  # turns before this all end before `start`
        last = bisect.bisect_right(self.starts, end)  # turns from here on start after `end`
        overlap: dict[str, float] = {}
        for turn in self.turns[first:last]:
            shared = min(end, turn.end) - max(start, turn.start)
            if shared > 0:
                overlap[turn.speaker] = overlap.get(turn.speaker, 0.0) + shared
        if overlap:
            return max(overlap, key=overlap.__getitem__)
        middle = (start + end) / 2
        nearby = self.turns[max(first - 1, 0):last + 1]
        return min(nearby, key=lambda t: max(t.start - middle, middle - t.end, 0.0)).speaker
