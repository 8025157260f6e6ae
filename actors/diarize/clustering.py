"""From speaker embeddings of pieces of speech to speaker turns: spectral clustering whose
count is the normalized maximum eigengap's (NME-SC), or clustering with a measured threshold
or a given count, then smoothing. Pure numpy, no model.

A piece is a stretch of one speech region (a few seconds at most) with one embedding pooled
over it. Pooling over seconds of speech is what separates voices: embeddings of single 1.6 s
windows are too noisy to cluster (DER ~0.5 on synthetic conversations), so windows only serve
to place a turn boundary inside a region (`best_split`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actors.diarize.linkage import fcluster, linkage

# NME-SC (Park et al., "Auto-tuning spectral clustering for speaker diarization using normalized
# maximum eigengap", 2019; as NeMo's offline clustering): each window keeps its p most alike
# neighbours, for every p from 2 up to this share of the windows; each p's graph Laplacian gives
# a count (its largest eigengap). The count is the one most p give (NeMo's
# `maj_vote_spk_count`): on a few dozen windows the single p with the clearest gap relative to
# p is often a small one whose graph falls apart into single turns, counting 6-8 speakers in a
# 20 s talk of two. Of the p that give it, the one with the clearest gap relative to p (the
# normalized maximum eigengap) shapes the clusters.
MAX_NEIGHBOUR_SHARE = 0.25
MAX_SPEAKERS = 8


@dataclass(frozen=True)
class Piece:
    """A stretch of speech (seconds) inside speech region `region`."""

    start: float
    end: float
    region: int

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray  # one speaker number per piece
    centroids: np.ndarray  # one unit vector per speaker


def cluster(embeddings: np.ndarray, weights: np.ndarray, reliable: np.ndarray, *, threshold: float,
            min_share: float = 0.0, bounds: tuple[int, int] = (1, 1 << 30)) -> Clustering:
    """Speakers of pieces: average-linkage clustering of the `reliable` pieces (long enough
    for a trustworthy embedding) on cosine similarity, stopped where clusters are less alike
    than `threshold`, or cut to a count within `bounds` (min, max); every other piece goes to
    the nearest speaker. `weights` (seconds of speech) weigh the centroids. A cluster the
    threshold found holding less than `min_share` of the weight is no speaker of its own but
    part of the most alike one, as far as `bounds` allow."""
    embeddings = _unit(np.asarray(embeddings, dtype=np.float64))
    if not len(embeddings):
        return Clustering(np.zeros(0, dtype=int), np.zeros((0, embeddings.shape[1] if embeddings.ndim == 2 else 0)))
    members = np.flatnonzero(reliable)
    if not len(members):  # only short speech: the best there is
        members = np.arange(len(embeddings))
    low, high = bounds
    if len(members) == 1:
        found = np.zeros(1, dtype=int)
    else:
        tree = linkage(embeddings[members], method="average", metric="cosine")
        found = fcluster(tree, t=1.0 - threshold, criterion="distance") - 1
        count = int(found.max()) + 1
        if not low <= count <= high:
            found = _cut(tree, embeddings[members], weights[members], min(max(count, low), high, len(members)),
                         min_share)
        else:
            found = _absorb_small(embeddings[members], weights[members], found, min_share, low)
    centroids = _centroids(embeddings[members], weights[members], found)
    labels = np.argmax(embeddings @ centroids.T, axis=1)
    labels[members] = found
    return Clustering(labels, centroids)


def spectral(embeddings: np.ndarray, *, bounds: tuple[int, int] = (1, MAX_SPEAKERS),
             seed: int = 0) -> np.ndarray:
    """Speaker numbers (0..) of windows by NME-SC: the count most p-neighbour graphs show by
    their largest eigengap (clamped to `bounds`, min and max), then k-means on the first
    eigenvectors of the Laplacian of the p with the clearest normalized gap for that count. The
    count is a property of the graph, not of a similarity threshold, so it does not depend on
    how alike one encoder makes voices in general; windows over overlapped speech link to
    either voice and make no cluster of their own."""
    vectors = _unit(np.asarray(embeddings, dtype=np.float64))
    n = len(vectors)
    low, high = bounds
    if n < 2 or high <= 1:
        return np.zeros(n, dtype=int)
    order = neighbour_order(vectors)
    graphs = eigengap_counts(order)
    found = [(count, ratio, p) for p, count, ratio, _ in graphs]
    votes = np.bincount([c for c, _, _ in found])
    voted = int(np.argmax(votes))  # a tie goes to the fewer speakers
    _, p = min((ratio, p) for c, ratio, p in found if c == voted)
    count = min(max(voted, low), high, n)
    if 1 < count != voted:
        # A count the bounds impose: the graph that shows that many clusters most clearly (as
        # NME-SC does for a known count), not the one that showed another count best (measured
        # on the real recordings given their count: DER 0.60 -> 0.47 on ami_3spk_c, others alike).
        _, p = min((_normalized_gap(eigenvalues, count, p), p) for p, _, _, eigenvalues in graphs)
    if count == 1:
        return np.zeros(n, dtype=int)
    features = np.linalg.eigh(_laplacian(order, p))[1][:, :count]
    rng = np.random.default_rng(seed)
    tries = [_kmeans(features, count, rng) for _ in range(10)]
    _, labels = min(tries, key=lambda t: float(((features - t[0][t[1]]) ** 2).sum()))
    return np.unique(labels, return_inverse=True)[1]


def neighbour_order(vectors: np.ndarray) -> np.ndarray:
    """Each unit vector's others, most alike (cosine) first."""
    return np.argsort(-(vectors @ vectors.T), axis=1)


def eigengap_counts(order: np.ndarray) -> list[tuple[int, int, float, np.ndarray]]:
    """For each p that NME-SC tries: (p, the count its largest eigengap gives, that gap's
    normalized ratio (p / n over the gap relative to the largest eigenvalue: smaller is
    clearer), the Laplacian's eigenvalues)."""
    n = len(order)
    found = []
    for p in range(2, max(2, int(n * MAX_NEIGHBOUR_SHARE)) + 1):
        eigenvalues = np.linalg.eigvalsh(_laplacian(order, p))
        gaps = np.diff(eigenvalues)[:min(MAX_SPEAKERS, n - 1)]
        count = int(np.argmax(gaps)) + 1
        found.append((p, count, _normalized_gap(eigenvalues, count, p), eigenvalues))
    return found


def _normalized_gap(eigenvalues: np.ndarray, count: int, p: int) -> float:
    """NME-SC's ratio for `count` clusters in the p-neighbour graph with these Laplacian
    eigenvalues: p / n over the gap after the count-th, relative to the largest (smaller is
    clearer)."""
    gap = eigenvalues[count] - eigenvalues[count - 1]
    return (p / len(eigenvalues)) / (gap / (eigenvalues[-1] + 1e-10) + 1e-10)


def _kmeans(points: np.ndarray, count: int, rng: np.random.Generator,
            rounds: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Centres and labels of `count` clusters of `points` by Lloyd's k-means, seeded by
    k-means++ (each next seed drawn in proportion to its squared distance from the chosen)."""
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, count):
        distances = ((points[:, None, :] - np.array(centres)[None]) ** 2).sum(axis=2).min(axis=1)
        total = distances.sum()
        chosen = rng.choice(len(points), p=distances / total) if total > 0 else rng.integers(len(points))
        centres.append(points[chosen])
    centres = np.array(centres)
    labels = np.zeros(len(points), dtype=int)
    for _ in range(rounds):
        labels = ((points[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
        moved = np.array([points[labels == c].mean(axis=0) if (labels == c).any() else centres[c]
                          for c in range(count)])
        if np.allclose(moved, centres):
            break
        centres = moved
    return centres, labels


def _laplacian(order: np.ndarray, p: int) -> np.ndarray:
    """Graph Laplacian of the symmetrized graph linking each window to its `p` most alike."""
    graph = np.zeros(order.shape)
    np.put_along_axis(graph, order[:, :p], 1.0, axis=1)
    graph = (graph + graph.T) / 2
    return np.diag(graph.sum(axis=1)) - graph


def _cut(tree: np.ndarray, embeddings: np.ndarray, weights: np.ndarray, wanted: int, min_share: float) -> np.ndarray:
    """`wanted` clusters from the tree: cut into the fewest clusters of which `wanted` hold
    `min_share` or more, the others merged into the most alike (a stray piece must not take
    one of the places while two voices share another)."""
    for count in range(wanted, len(embeddings) + 1):
        labels = fcluster(tree, t=count, criterion="maxclust") - 1
        shares = np.bincount(labels, weights=weights) / weights.sum()
        if (shares >= min_share).sum() >= wanted:
            return _absorb_small(embeddings, weights, labels, np.inf, wanted)
    return fcluster(tree, t=wanted, criterion="maxclust") - 1


def _absorb_small(embeddings: np.ndarray, weights: np.ndarray, labels: np.ndarray, min_share: float,
                  least: int) -> np.ndarray:
    """`labels` with clusters under `min_share` of the weight merged, smallest first, into the
    cluster whose centroid is most alike, while more than `least` remain; renumbered 0.."""
    labels = labels.copy()
    while True:
        present = np.unique(labels)
        shares = np.array([weights[labels == c].sum() for c in present]) / weights.sum()
        if len(present) <= least or shares.min() >= min_share:
            return np.unique(labels, return_inverse=True)[1]
        small = present[int(np.argmin(shares))]
        centroids = _unit(np.array([(embeddings[labels == c] * weights[labels == c, None]).sum(axis=0)
                                    for c in present]))
        alike = centroids @ centroids[present == small][0]
        alike[present == small] = -np.inf
        labels[labels == small] = present[int(np.argmax(alike))]


def _centroids(embeddings: np.ndarray, weights: np.ndarray, labels: np.ndarray) -> np.ndarray:
    count = int(labels.max()) + 1
    sums = np.zeros((count, embeddings.shape[1]))
    np.add.at(sums, labels, embeddings * weights[:, None])
    return _unit(sums)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def best_split(times: np.ndarray, margins: np.ndarray) -> float | None:
    """Where the speaker changes in a run of windows, given each window's centre time and how
    much more it resembles the first speaker than the second: the cut that leaves the most
    margin on either side (first speaker before it, second after), halfway between two
    windows. None when fewer than two windows."""
    if len(times) < 2:
        return None
    # Score of cutting before window j: margins before it minus margins from it on.
    before = np.concatenate([[0.0], np.cumsum(margins)])
    scores = before - (before[-1] - before)
    j = int(np.argmax(scores[1:-1])) + 1
    return float((times[j - 1] + times[j]) / 2)


def absorb_islands(pieces: list[Piece], labels: list[int], *, bridge: float, min_turn: float) -> list[int]:
    """`labels` with every piece shorter than `min_turn` that sits between two pieces of one
    other speaker, none further than `bridge` away, given to that speaker: one voice does not
    flick to another for an instant."""
    labels = list(labels)
    for i in range(1, len(pieces) - 1):
        before, piece, after = pieces[i - 1], pieces[i], pieces[i + 1]
        if (piece.duration < min_turn and labels[i - 1] == labels[i + 1] != labels[i]
                and piece.start - before.end <= bridge and after.start - piece.end <= bridge):
            labels[i] = labels[i - 1]
    return labels


def join(pieces: list[Piece], labels: list[int], *, bridge: float) -> list[tuple[float, float, int]]:
    """Turns (start, end, speaker number) from labelled pieces in time order: pieces of one
    speaker less than `bridge` apart are one turn, the pause between them included."""
    turns: list[tuple[float, float, int]] = []
    for piece, label in zip(pieces, labels):
        if turns and turns[-1][2] == label and piece.start - turns[-1][1] <= bridge:
            turns[-1] = (turns[-1][0], max(turns[-1][1], piece.end), label)
        else:
            turns.append((piece.start, piece.end, label))
    return turns
