"""VectorIndex: exact top-k against brute force, exact-k filtering, upserts, persistence."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memlayer import CorruptionError, InvalidInputError
from memlayer.retrievers.vector_index import IndexConfig, VectorIndex


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 300),
    k=st.integers(1, 20),
    frac=st.floats(0.0, 1.0),
    brute=st.booleans(),
)
def test_filtered_search_is_exact_k(seed: int, n: int, k: int, frac: float, brute: bool) -> None:
    rng = np.random.default_rng(seed)
    vectors = _unit(rng, n, 16)
    ids = rng.choice(10_000, size=n, replace=False).astype(np.int64)
    index = VectorIndex(16, IndexConfig(brute_force_below=10_000 if brute else 0))
    index.add(ids, vectors)
    allowed = ids[rng.random(n) < frac]
    allowed = np.concatenate([allowed, np.array([20_000], dtype=np.int64)])  # unknown id
    query = _unit(rng, 1, 16)
    scores, got = index.search(query, k, allowed)
    mask = np.isin(ids, allowed)
    sims = vectors[mask] @ query[0]
    take = min(k, int(mask.sum()))
    expected = np.sort(sims)[::-1][:take]
    assert (got[0, :take] >= 0).all() and (got[0, take:] == -1).all()
    assert set(got[0, :take]) <= set(ids[mask])
    np.testing.assert_allclose(scores[0, :take], expected, rtol=1e-5, atol=1e-5)


def test_upsert_replaces_and_remove_forgets() -> None:
    rng = np.random.default_rng(0)
    v = _unit(rng, 3, 8)
    index = VectorIndex(8)
    index.add(np.array([1, 2, 3]), v)
    index.add(np.array([2]), v[:1])
    assert len(index) == 3
    _, got = index.search(v[:1], 2)
    assert set(got[0]) == {1, 2}
    index.remove(np.array([1, 99]))
    assert len(index) == 2 and 1 not in index and 2 in index


def test_save_load_and_corruption(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    index = VectorIndex(8)
    index.add(np.arange(50), _unit(rng, 50, 8))
    path = tmp_path / "v.idx"
    index.save(path, applied_seq=17)
    loaded, seq = VectorIndex.load(path)
    assert seq == 17 and len(loaded) == 50
    q = _unit(rng, 2, 8)
    np.testing.assert_array_equal(loaded.search(q, 5)[1], index.search(q, 5)[1])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptionError):
        VectorIndex.load(path)


def test_bad_shapes_are_rejected() -> None:
    index = VectorIndex(4)
    with pytest.raises(InvalidInputError, match="vectors"):
        index.add(np.array([1]), np.ones((1, 3), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="k"):
        index.search(np.ones((1, 4), dtype=np.float32), 0)


def _clustered(rng: np.random.Generator, n: int, dim: int, centres: int) -> np.ndarray:
    means = _unit(rng, centres, dim)
    x = means[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_recall_updates_and_persistence(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    data = _clustered(rng, 12_000, 32, 200)
    index = VectorIndex(32, IndexConfig(approx_threshold=5_000, train_sample=12_000))
    for start in range(0, len(data), 1_000):
        index.add(np.arange(start, start + 1_000), data[start : start + 1_000])
    assert index.approximate and len(index) == 12_000
    queries = _clustered(rng, 50, 32, 200)
    _, got = index.search(queries, 10)
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact, strict=True)])
    assert recall >= 0.9
    index.remove(np.arange(0, 6_000))
    index.add(np.array([7_000]), data[:1])
    assert len(index) == 6_000 and 0 not in index
    _, got = index.search(data[:1], 1)
    assert got[0, 0] == 7_000
    index.save(tmp_path / "ivf.idx", applied_seq=3)
    loaded, _ = VectorIndex.load(tmp_path / "ivf.idx")
    assert loaded.approximate and len(loaded) == 6_000
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], index.search(queries, 5)[1])


@pytest.mark.parametrize("brute", [True, False])
def test_filtered_search_sees_later_adds_and_removes(brute: bool) -> None:
    """A large allowed set is matched against the stored ids as they are now, not as cached."""
    rng = np.random.default_rng(3)
    index = VectorIndex(8, IndexConfig(brute_force_below=1_000 if brute else 0))
    index.add(np.arange(100), _unit(rng, 100, 8))
    everything = np.arange(200)
    query = _unit(rng, 1, 8)
    index.search(query, 3, everything)
    index.add(np.array([150]), query)
    scores, got = index.search(query, 3, everything)
    assert got[0, 0] == 150 and scores[0, 0] == pytest.approx(1.0)
    index.remove(np.array([150]))
    _, got = index.search(query, 3, everything)
    assert 150 not in got[0] and (got[0] >= 0).all()


@pytest.mark.parametrize(
    ("bad", "rule"),
    [(0.0, "all zeros"), (np.nan, "finite"), (np.inf, "finite"), (-np.inf, "finite")],
)
def test_add_refuses_zero_and_non_finite_vectors(bad: float, rule: str) -> None:
    """The whole batch is refused, naming the field and the rule, and nothing changes."""
    rng = np.random.default_rng(4)
    index = VectorIndex(8)
    old = _unit(rng, 3, 8)
    index.add(np.array([1, 2, 3]), old)
    batch = _unit(rng, 2, 8)
    if bad == 0.0:
        batch[1] = 0.0
    else:
        batch[1, 5] = bad
    with pytest.raises(InvalidInputError, match=rule) as caught:
        index.add(np.array([2, 4]), batch)
    assert caught.value.field == "vectors"
    assert len(index) == 3 and 4 not in index
    scores, got = index.search(old[1:2], 1)
    assert got[0, 0] == 2 and scores[0, 0] == pytest.approx(1.0)


SAVED_SIZES = {1: 30_000, 2: 20_000}  # applied_seq -> vectors, one index per saver


def _save_repeatedly(path: str, seq: int, rounds: int, start: Any) -> None:
    """Saver process: build its own index, wait for the others, save it `rounds` times."""
    index = VectorIndex(16)
    index.add(np.arange(SAVED_SIZES[seq]), _unit(np.random.default_rng(seq), SAVED_SIZES[seq], 16))
    start.wait()
    for _ in range(rounds):
        index.save(Path(path), applied_seq=seq)


def test_concurrent_saves_never_tear_or_mix(tmp_path: Path) -> None:
    """Two processes save different indexes to one path while this one loads it.

    Every load must succeed and be one of the two saved indexes, whole.
    """
    path = tmp_path / "v.idx"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    _save_repeatedly(str(path), 1, 1, context.Barrier(1))
    savers = [
        context.Process(target=_save_repeatedly, args=(str(path), seq, 40, start))
        for seq in SAVED_SIZES
    ]
    for saver in savers:
        saver.start()
    loads = 0
    try:
        start.wait(timeout=120)
        while any(saver.is_alive() for saver in savers) or loads < 20:
            index, seq = VectorIndex.load(path)
            assert len(index) == SAVED_SIZES[seq]
            loads += 1
    finally:
        for saver in savers:
            saver.join(timeout=120)
    assert [saver.exitcode for saver in savers] == [0, 0]
    assert [entry.name for entry in tmp_path.iterdir()] == ["v.idx"]


def test_failed_save_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(6)
    path = tmp_path / "v.idx"
    VectorIndex(8).save(path, applied_seq=1)
    index = VectorIndex(8)
    index.add(np.arange(10), _unit(rng, 10, 8))

    def refuse(*_: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("os.replace", refuse)
    with pytest.raises(OSError, match="disk gone"):
        index.save(path, applied_seq=2)
    monkeypatch.undo()
    loaded, seq = VectorIndex.load(path)
    assert seq == 1 and len(loaded) == 0
    assert [entry.name for entry in tmp_path.iterdir()] == ["v.idx"]


class _ThreadsSeen:
    """Stands in front of a FAISS index and records FAISS's OpenMP thread count per search."""

    def __init__(self, index: Any) -> None:
        self._index = index
        self.seen: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._index, name)

    def search(self, *args: Any, **kwargs: Any) -> Any:
        import faiss

        self.seen.append(faiss.omp_get_max_threads())
        return self._index.search(*args, **kwargs)


@pytest.mark.parametrize("allowed", [None, "half"])
def test_a_few_queries_search_on_the_calling_thread_alone(allowed: str | None) -> None:
    """A flat search of a few queries runs FAISS single-threaded (a thread team only waits at
    its barrier for a busy core), a batch keeps the caller's threads, and the caller's
    setting is as it was after."""
    import faiss

    rng = np.random.default_rng(3)
    vectors = _unit(rng, 400, 16)
    ids = np.arange(400, dtype=np.int64)
    index = VectorIndex(16, IndexConfig(brute_force_below=0))
    index.add(ids, vectors)
    spy = _ThreadsSeen(index._index)
    index._index = spy
    subset = ids[::2] if allowed else None
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        one = index.search(_unit(rng, 1, 16), 5, subset)
        batch = index.search(_unit(rng, 30, 16), 5, subset)
        after = faiss.omp_get_max_threads()
    finally:
        faiss.omp_set_num_threads(before)
    assert spy.seen == [1, 2]
    assert after == 2
    assert one[1].shape == (1, 5) and batch[1].shape == (30, 5)
    if subset is not None:
        assert set(one[1].ravel().tolist()) <= set(subset.tolist())


def test_configured_threads_apply_on_every_calling_thread() -> None:
    """`IndexConfig.threads` holds for a batch searched from a thread other than the one that
    built the index (OpenMP keeps a thread count per calling thread)."""
    import threading

    import faiss

    rng = np.random.default_rng(4)
    index = VectorIndex(16, IndexConfig(threads=1))
    index.add(np.arange(100, dtype=np.int64), _unit(rng, 100, 16))
    spy = _ThreadsSeen(index._index)
    index._index = spy

    def search_batch() -> None:
        faiss.omp_set_num_threads(2)
        index.search(_unit(rng, 30, 16), 3)

    worker = threading.Thread(target=search_batch)
    worker.start()
    worker.join()
    assert spy.seen == [1]
