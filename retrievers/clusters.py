"""Cluster unit vectors with FAISS k-means and choose the number of clusters by silhouette.

Clustered context (CRAG) groups the retrieved candidates by meaning and keeps one compact
representative per group. The number of groups is searched on a small grid of k up to a
limit the caller derives from its token budget; the k whose clustering has the best mean
silhouette (cosine distance) wins. Seeded, so one input always gives one clustering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

K_GRID = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class Clustering:
    """`labels[i]` is the cluster of vector i (0..k-1, every cluster non-empty); `centroids`
    are the clusters' unit mean directions; `silhouette` the mean silhouette (0 for k=1)."""

    labels: np.ndarray
    centroids: np.ndarray
    silhouette: float

    @property
    def k(self) -> int:
        """Number of clusters."""
        return len(self.centroids)


def cluster(
    vectors: np.ndarray,
    max_clusters: int,
    *,
    seed: int = 0,
    niter: int = 10,
    redo: int = 3,
    tolerance: float = 0.0,
) -> Clustering:
    """The spherical k-means clustering of `vectors` (n, d) with at most `max_clusters`
    clusters whose silhouette is best, or the one with the most clusters among those within
    `tolerance` of the best silhouette; one cluster when fewer than three vectors or a limit
    below 2."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    limit = min(max_clusters, len(vectors) - 1)
    tried = [_single(vectors)]
    tried += [_kmeans(vectors, k, seed, niter, redo) for k in K_GRID if k <= limit]
    tried = [c for c in tried if c.k > 1] or tried[:1]
    best = max(c.silhouette for c in tried)
    return max((c for c in tried if c.silhouette >= best - tolerance), key=lambda c: c.k)


def _single(vectors: np.ndarray) -> Clustering:
    labels = np.zeros(len(vectors), dtype=np.int64)
    return Clustering(labels, _unit(vectors.sum(axis=0, keepdims=True)), 0.0)


def _kmeans(vectors: np.ndarray, k: int, seed: int, niter: int, redo: int = 1) -> Clustering:
    """One seeded FAISS k-means run; empty clusters are dropped and labels renumbered."""
    import faiss

    options = faiss.ClusteringParameters()
    options.niter = niter
    options.seed = seed
    options.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    options.nredo = redo  # the best of a few seeded starts: one start often merges two clusters
    options.spherical = True
    options.min_points_per_centroid = 1
    options.max_points_per_centroid = len(vectors)
    index = faiss.IndexFlatIP(vectors.shape[1])
    faiss.Clustering(vectors.shape[1], k, options).train(vectors, index)
    _, assigned = index.search(vectors, 1)
    used, labels = np.unique(assigned[:, 0], return_inverse=True)
    members = np.zeros((len(used), len(vectors)), dtype=np.float32)
    members[labels, np.arange(len(vectors))] = 1.0
    sums = members @ vectors
    return Clustering(labels.astype(np.int64), _unit(sums), _silhouette(vectors, labels, sums))


def _silhouette(vectors: np.ndarray, labels: np.ndarray, sums: np.ndarray) -> float:
    """Mean silhouette under cosine distance, in O(n·d·k): for unit vectors the summed
    distance from x to cluster c is |c| - x·sum(c). Points alone in their cluster score 0."""
    sizes = np.bincount(labels, minlength=len(sums)).astype(np.float64)
    if len(sums) < 2:
        return 0.0
    distance = sizes[None, :] - (vectors @ sums.T).astype(np.float64)
    rows = np.arange(len(vectors))
    own_size = sizes[labels]
    inside = np.divide(
        distance[rows, labels], own_size - 1, out=np.zeros(len(vectors)), where=own_size > 1
    )
    mean_to = distance / sizes[None, :]
    mean_to[rows, labels] = np.inf
    nearest = mean_to.min(axis=1)
    widest = np.maximum(inside, nearest)
    score = np.divide(nearest - inside, widest, out=np.zeros(len(vectors)), where=widest > 0)
    score[own_size <= 1] = 0.0
    return float(score.mean())


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0).astype(np.float32)
