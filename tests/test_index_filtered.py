"""Filtered search on the IVF path: the true top-k of the allowed ids, at any selectivity.

The IVF threshold and the brute-force cut-off are lowered so a few thousand vectors take
the approximate path; every answer is checked against exact filtered search (a matmul over
the allowed vectors).
"""

from __future__ import annotations

import numpy as np
import pytest

from memlayer.retrievers.vector_index import IndexConfig, VectorIndex

DIM = 32
SIZE = 4_000
K = 10
BRUTE = 100  # allowed sets up to this size are scored by brute force


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _vectors(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """Clustered (around 80 fixed centres, like text embeddings) or uniform unit vectors."""
    noise = rng.standard_normal((n, DIM))
    if kind == "uniform":
        return _unit(noise)
    centres = _unit(np.random.default_rng(99).standard_normal((80, DIM)))
    return _unit(centres[rng.integers(0, len(centres), n)] + 0.8 * noise / np.sqrt(DIM))


def _index(vectors: np.ndarray, brute_force_below: int) -> VectorIndex:
    """An IVF index trained on the first 1,200 vectors; the rest are added after training."""
    config = IndexConfig(approx_threshold=1_200, brute_force_below=brute_force_below)
    index = VectorIndex(DIM, config)
    for start in range(0, len(vectors), 400):
        index.add(np.arange(start, start + 400), vectors[start : start + 400])
    assert index.approximate
    return index


@pytest.fixture(scope="module", params=["clustered", "uniform"])
def corpus(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray, VectorIndex]:
    rng = np.random.default_rng(7)
    vectors = _vectors(request.param, rng, SIZE)
    queries = _vectors(request.param, rng, 40)
    return vectors, queries, _index(vectors, BRUTE)


def _exact(
    vectors: np.ndarray, queries: np.ndarray, allowed: np.ndarray, k: int
) -> tuple[np.ndarray, list[set[int]]]:
    """Exact filtered top-k: the k-th best allowed score per query and the true id sets."""
    sims = queries @ vectors[allowed].T
    take = min(k, len(allowed))
    top = np.argsort(-sims, axis=1)[:, :take]
    return sims, [set(allowed[row].tolist()) for row in top]


def _check(
    index: VectorIndex, vectors: np.ndarray, queries: np.ndarray, allowed: np.ndarray
) -> float:
    """Search under `allowed`, assert exact-k and true scores, return mean recall@K.

    `allowed` may repeat ids and name ids that are not stored; only stored ones count.
    """
    scores, got = index.search(queries, K, allowed)
    known = np.unique(allowed[(allowed >= 0) & (allowed < len(vectors))])
    _, truth = _exact(vectors, queries, known, K)
    want = min(K, len(known))
    assert (got[:, :want] >= 0).all(), "fewer than k hits although enough ids are allowed"
    assert (got[:, want:] == -1).all() and np.isneginf(scores[:, want:]).all()
    assert np.isin(got[:, :want], known).all(), "a hit outside the allowed ids"
    assert all(len(set(row)) == want for row in got[:, :want].tolist()), "a repeated hit"
    real = np.einsum("qd,qkd->qk", queries, vectors[got[:, :want]])
    np.testing.assert_allclose(scores[:, :want], real, atol=1e-5)
    assert (np.diff(scores[:, :want], axis=1) <= 1e-6).all(), "hits not best first"
    hits = [len(truth[row] & set(got[row, :want].tolist())) for row in range(len(queries))]
    return float(np.mean(hits)) / want


@pytest.mark.parametrize("fraction", [0.005, 0.02, 0.05, 0.15, 0.5, 1.0])
def test_filtered_recall_at_any_selectivity(
    corpus: tuple[np.ndarray, np.ndarray, VectorIndex], fraction: float
) -> None:
    """Random allowed sets from 20 ids (brute force) to the whole collection (IVF).

    Each set also repeats some ids and names two that are not stored.
    """
    vectors, queries, index = corpus
    rng = np.random.default_rng(int(fraction * 1_000))
    chosen = rng.choice(SIZE, size=int(fraction * SIZE), replace=False)
    assert (len(chosen) > BRUTE) == (fraction >= 0.05)
    allowed = np.concatenate([chosen, chosen[:5], [-3, SIZE + 5]]).astype(np.int64)
    assert _check(index, vectors, queries, allowed) >= 0.95


def test_filter_that_excludes_the_neighbourhood(
    corpus: tuple[np.ndarray, np.ndarray, VectorIndex],
) -> None:
    """Allowed ids far from every query: the probe must go past the nearest lists."""
    vectors, queries, index = corpus
    direction = _unit(queries.mean(axis=0, keepdims=True))[0]
    allowed = np.flatnonzero(vectors @ direction < np.quantile(vectors @ direction, 0.3))
    assert len(allowed) > BRUTE
    assert _check(index, vectors, queries, allowed) >= 0.95


@pytest.mark.parametrize("count", [0, 1, 3, K, 40, 400])
def test_ivf_path_is_exact_k_and_pads(count: int) -> None:
    """With brute force off, small allowed sets (and unknown ids) go through the IVF path."""
    rng = np.random.default_rng(count)
    vectors = _vectors("clustered", rng, SIZE)
    queries = _vectors("clustered", rng, 20)
    index = _index(vectors, brute_force_below=0)
    known = rng.choice(SIZE, size=count, replace=False)
    allowed = np.concatenate([known, known[:2], np.array([SIZE + 5, -3])]).astype(np.int64)
    if count == 0:
        scores, got = index.search(queries, K, allowed)
        assert (got == -1).all() and np.isneginf(scores).all()
        return
    assert _check(index, vectors, queries, allowed) >= (1.0 if count <= K else 0.95)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_no_query_stops_far_from_its_answer(fraction: float) -> None:
    """Per query, not just on average: on uniform data, where list order says little."""
    rng = np.random.default_rng(11)
    vectors = _vectors("uniform", rng, SIZE)
    queries = _vectors("uniform", rng, 300)
    index = _index(vectors, BRUTE)
    allowed = rng.choice(SIZE, size=int(fraction * SIZE), replace=False)
    _, got = index.search(queries, K, allowed)
    _, truth = _exact(vectors, queries, allowed, K)
    recall = [len(truth[row] & set(got[row].tolist())) / K for row in range(len(queries))]
    assert min(recall) >= 0.8
