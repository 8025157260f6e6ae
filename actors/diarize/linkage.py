"""Average-linkage clustering on cosine distance, in numpy: the two calls of
`scipy.cluster.hierarchy` the clustering makes (`linkage`, `fcluster`), with their arguments and
tree format, so the diarize runtime needs no scipy (140 MB) in the default install.
tests/test_diarize.py checks them against scipy's."""

from __future__ import annotations

import numpy as np


def linkage(points: np.ndarray, method: str = "average", metric: str = "cosine") -> np.ndarray:
    """The merge tree of `points`: rows (cluster a, cluster b, distance, size) as scipy's, the
    closest pair of clusters first, a merged cluster numbered n, n+1, ... O(n^2) memory."""
    if method != "average" or metric != "cosine":
        raise ValueError("only average linkage on cosine distance")
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    units = points / np.linalg.norm(points, axis=1, keepdims=True)
    distances = np.maximum(1.0 - units @ units.T, 0.0)
    np.fill_diagonal(distances, np.inf)
    ids = np.arange(n)
    sizes = np.ones(n)
    tree = np.zeros((max(n - 1, 0), 4))
    for step in range(n - 1):
        i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
        i, j = min(i, j), max(i, j)
        size = sizes[i] + sizes[j]
        tree[step] = (min(ids[i], ids[j]), max(ids[i], ids[j]), distances[i, j], size)
        # Lance-Williams for average linkage: the merged cluster's distance to every other one
        # is its parts' distances weighted by their sizes.
        merged = (sizes[i] * distances[i] + sizes[j] * distances[j]) / size
        distances[i], distances[:, i] = merged, merged
        distances[i, i] = np.inf
        distances[j], distances[:, j] = np.inf, np.inf
        ids[i], sizes[i] = n + step, size
    return tree


def fcluster(tree: np.ndarray, t: float, criterion: str = "distance") -> np.ndarray:
    """Flat clusters (numbered from 1) of a `linkage` tree: those merged no further apart than
    `t` (criterion "distance"), or the fewest merged that leaves at most `t` clusters
    ("maxclust"; tied merges go together, as in scipy)."""
    n = len(tree) + 1
    if criterion == "maxclust":
        needed = n - int(t)
        threshold = tree[needed - 1, 2] if needed > 0 else -np.inf
    elif criterion == "distance":
        threshold = t
    else:
        raise ValueError(f"unknown criterion {criterion!r}")
    parent = list(range(2 * n - 1))
    for step, (a, b, distance, _) in enumerate(tree):
        if distance <= threshold:  # average linkage is monotonic: merges only grow apart
            parent[int(a)] = parent[int(b)] = n + step

    def root(node: int) -> int:
        while parent[node] != node:
            node = parent[node]
        return node

    roots = [root(leaf) for leaf in range(n)]
    return np.unique(roots, return_inverse=True)[1] + 1
