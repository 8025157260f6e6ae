"""Word error rates: WER, and CHiME-6's cpWER (concatenated minimum-permutation WER: each
speaker's words end to end, the found speakers paired with the true ones to minimize errors)."""

from __future__ import annotations

import itertools
import re

import numpy as np


def tokens(text: str) -> list[str]:
    """Lowercase words, punctuation dropped."""
    return re.findall(r"[a-z0-9']+", text.lower())


def edits(reference: list[str], hypothesis: list[str]) -> int:
    """Word-level Levenshtein distance."""
    row = list(range(len(hypothesis) + 1))
    for i, word in enumerate(reference, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(hypothesis, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1]


def wer(reference: list[tuple[str, str]], hypothesis: list[tuple[str, str]]) -> float:
    """Of (speaker, text) pairs in time order, speakers ignored."""
    words = [w for _, text in reference for w in tokens(text)]
    return edits(words, [w for _, text in hypothesis for w in tokens(text)]) / max(1, len(words))


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
    cost = np.array([[edits(t, f) for f in found] for t in truth])
    best = min(sum(cost[i, j] for i, j in enumerate(order)) for order in itertools.permutations(range(size)))
    return best / max(1, sum(len(t) for t in truth))
