"""Segments as sentences, built from word timestamps: the one rule every runtime's segments follow,
batched or not, so subtitles and segment lists do not depend on how a decoder cut its windows.

A segment ends after a word that ends a sentence (`.`, `?`, `!` ...) when a pause follows it,
after any word followed by a pause of `pause` seconds or more, and before a word that would make it
longer than `max_seconds`. It never ends inside a word, and words keep their times. Pure:
contracts in, contracts out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from dalston.contracts import Segment, Word

SENTENCE_END = (".", "?", "!", "…", "。", "？", "！")
# Whisper's word times run on from word to word inside a sentence; this much silence after a
# full stop is a sentence break (less is an abbreviation's dot, or a decimal point read out).
SENTENCE_PAUSE = 0.1


class Sentences:
    """Decoder segments in, sentence segments out, as soon as each one is complete (the next
    word shows where it ends), for streaming; `close` hands out the last one."""

    def __init__(self, pause: float, max_seconds: float, keep_words: bool = True) -> None:
        self.pause, self.max_seconds, self.keep_words = pause, max_seconds, keep_words
        self.words: list[Word] = []
        self.source: Segment | None = None  # the decoder segment of the current sentence's first word
        self.count = 0

    def add(self, piece: Segment) -> list[Segment]:
        if not piece.words:
            # A runtime without word times: its segments stand as they are.
            text = piece.text.strip()
            return [*self.close(), *([self._numbered(msgspec.structs.replace(piece, text=text))] if text else [])]
        done = []
        for word in piece.words:
            if self.words and self._ends_before(word):
                done += self.close()
            if not self.words:
                self.source = piece
            self.words.append(word)
        return done

    def close(self) -> list[Segment]:
        if not self.words:
            return []
        words, source, self.words = self.words, self.source, []
        text = joined(words)
        if not text:
            return []
        return [self._numbered(msgspec.structs.replace(
            source, start=words[0].start, end=words[-1].end, text=text,
            # Tokens cannot be apportioned to words: a sentence keeps them only where it is
            # its decoder segment whole.
            tokens=source.tokens if words == source.words else [],
            words=words if self.keep_words else []))]

    def _ends_before(self, word: Word) -> bool:
        last = self.words[-1]
        gap = word.start - last.end
        return (gap >= self.pause
                or (gap >= SENTENCE_PAUSE and last.word.strip().endswith(SENTENCE_END))
                or word.end - self.words[0].start > self.max_seconds)

    def _numbered(self, segment: Segment) -> Segment:
        self.count += 1
        return msgspec.structs.replace(segment, id=self.count - 1)


def sentences(pieces: Iterable[Segment], pause: float, max_seconds: float,
              keep_words: bool = True) -> list[Segment]:
    """Decoder segments regrouped into sentence segments, numbered from 0."""
    builder = Sentences(pause, max_seconds, keep_words)
    result = [s for piece in pieces for s in builder.add(piece)]
    return result + builder.close()


def joined(words: Sequence[Word]) -> str:
    """The text of consecutive words. Whisper's words carry their own leading space (and none
    before punctuation); NeMo's none, so they are joined with one."""
    if any(w.word[:1].isspace() for w in words[1:]):
        return "".join(w.word for w in words).strip()
    return " ".join(w.word.strip() for w in words).strip()
