"""Word error rates: WER, and CHiME-6's cpWER (concatenated minimum-permutation WER: each
speaker's words end to end, the found speakers paired with the true ones to minimize errors)."""

from __future__ import annotations

import itertools
import re

import numpy as np

from dalston.synthetic_speech import word_edits


def tokens(text: str) -> list[str]:
    """Lowercase words, punctuation dropped."""
    return re.findall(r"[a-z0-9']+", text.lower())


def wer(reference: list[tuple[str, str]], hypothesis: list[tuple[str, str]]) -> float:
    """Of (speaker, text) pairs in time order, speakers ignored."""
    words = [w for _, text in reference for w in tokens(text)]
    return word_edits(words, [w for _, text in hypothesis for w in tokens(text)]) / max(1, len(words))


def cpwer(reference: list[tuple[str, str]], hypothesis: list[tuple[str, str]]) -> float:
    """Of (speaker, text) pairs in time order; a speaker one side lacks has no words there."""
    def by_speaker(pairs: list[tuple[str, str]]) -> list[list[str]]:
        spoken: dict[str, list[str]] = {}
        for speaker, text in pairs:
            spoken.setdefault(speaker, []).extend(tokens(text))
        return list(spoken.values())

    truth, found = by_speaker(reference), by_speaker(hypothesis)
    size = max(len(truth), len(found))
    truth, found = truth + [[]] * (size - len(truth)), found + [[]] * (size - len(found))
    cost = np.array([[word_edits(t, f) for f in found] for t in truth])
    best = min(sum(cost[i, j] for i, j in enumerate(order)) for order in itertools.permutations(range(size)))
    return best / max(1, sum(len(t) for t in truth))
