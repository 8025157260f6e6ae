"""Why the GE2E diarizer counts what it counts, per real recording (tests/data/conversations):
how much of the reference speech Silero's regions miss, how many 1.6 s windows each reference
speaker gets (and how many lie over overlapped speech), the cosine of windows of one speaker
against windows of two and their AUC (how often a same-speaker pair is the more alike: no
threshold, so encoders compare on it as they are), the count each p-neighbour graph of NME-SC
gives, and the Laplacian's first eigenvalues at the p the count is taken from. No timing: it
reads what the pipeline sees.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np

from actors.diarize.clustering import eigengap_counts, neighbour_order
from actors.diarize.ge2e import MIN_WINDOWS, Ge2eDiarizer, at_training_level, speech_regions
from bench.conversations import Recording, recordings
from dalston.catalog import Catalog
from dalston.pull import pull
from dalston.store import ModelStore

DIARIZER = "resemblyzer-ge2e"
# A window over more than this share of a second voice counts as overlapped.
OVERLAPPED = 0.25


def _seconds_inside(turns: list[tuple[float, float]], spans: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in turns for c, d in spans)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def pair_auc(same: np.ndarray, other: np.ndarray) -> float:
    """The chance that a same-speaker pair is more alike than a two-speaker pair (ties count
    half): 1.0 separates every pair, 0.5 is chance."""
    other = np.sort(other)
    below = np.searchsorted(other, same, side="left")
    above = np.searchsorted(other, same, side="right")
    return float(np.mean((below + above) / 2) / len(other))


def diagnose(diarizer: Ge2eDiarizer, talk: Recording) -> list[str]:
    regions = speech_regions(talk.audio)
    speech = _union([(t.start, t.end) for t in talk.turns])
    spoken = sum(b - a for a, b in speech)
    missed = spoken - _seconds_inside(speech, regions)
    lines = [f"{talk.name}: {len(talk.speakers)} speakers, {spoken:.1f} s of speech, VAD misses "
             f"{missed / spoken:.0%}, adds {sum(b - a for a, b in regions) - _seconds_inside(speech, regions):.1f} s"]
    if not regions:
        return lines
    windows, embeddings = diarizer.embed_windows(at_training_level(talk.audio, regions), regions, threading.Event())
    owners, overlapped = [], 0
    for window in windows:
        seconds = Counter()
        for turn in talk.turns:
            seconds[turn.speaker] += max(0.0, min(turn.end, window.end) - max(turn.start, window.start))
        ranked = [s for s, t in seconds.most_common() if t > 0]
        owners.append(ranked[0] if ranked else None)
        overlapped += len(ranked) > 1 and seconds[ranked[1]] > OVERLAPPED * window.duration
    counts = Counter(owners)
    per_speaker = sorted(talk.speakers, key=lambda s: -sum(t.end - t.start for t in talk.turns if t.speaker == s))
    lines.append(f"  windows {len(windows)} ({'NME-SC' if len(windows) >= MIN_WINDOWS else 'too few: pieces by threshold'}"
                 f"): " + ", ".join(f"{s} {counts[s]}" for s in per_speaker)
                 + f", no speaker {counts[None]}, overlapped {overlapped}")
    vectors = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    affinity = vectors @ vectors.T
    same, other = [], []
    for i in range(len(owners)):
        for j in range(i + 1, len(owners)):
            if owners[i] and owners[j]:
                (same if owners[i] == owners[j] else other).append(affinity[i, j])
    if same and other:
        lines.append(f"  window cosine: same speaker {np.mean(same):.3f}, two speakers {np.mean(other):.3f}, "
                     f"AUC {pair_auc(np.array(same), np.array(other)):.3f}")
    if len(windows) >= 3:
        found = eigengap_counts(neighbour_order(vectors))
        lines.append("  count by p: " + " ".join(f"{p}:{count}" for p, count, _, _ in found))
        _, _, _, eigenvalues = min(found, key=lambda f: f[2])
        lines.append("  eigenvalues at the clearest p: " + " ".join(f"{e:.2f}" for e in eigenvalues[:8]))
    return lines


def run(root: Path) -> list[str]:
    catalog = Catalog.load()
    path = pull(catalog.model(DIARIZER), catalog.runtime("diarize"), ModelStore(root / "models"))
    diarizer = Ge2eDiarizer(path)
    try:
        return ["diarization diagnosis: what the count sees on the real conversations"] + [
            line for talk in recordings() for line in diagnose(diarizer, talk)]
    finally:
        diarizer.unload()
