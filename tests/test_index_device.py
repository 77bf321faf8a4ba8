"""IndexConfig.device: the vector index searches on a GPU copy when FAISS's GPU build has a
GPU, with the CPU index's answers; on the CPU otherwise; "cuda" without one is a clear error.

The GPU copy's bookkeeping (made at the first search, inserts mirrored, dropped on removal and
retraining, never used for filtered searches) is checked on the CPU, with FAISS's CPU build
playing the GPU build (its GPU copy a CPU clone); the `gpu` test checks the real copy against
CPU FAISS where FAISS's GPU build has a GPU.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faiss
import numpy as np
import pytest

from memlayer import InvalidInputError, Memory, MissingExtraError, threads
from memlayer.retrievers import faiss_device
from memlayer.retrievers.vector_index import IndexConfig, VectorIndex

DIM = 16
GPU_FAISS = faiss_device.gpu_count(faiss) > 0
cpu_faiss_only = pytest.mark.skipif(GPU_FAISS, reason="FAISS's GPU build sees a GPU here")


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _config(kind: str, device: str) -> IndexConfig:
    # an IVF past 400 vectors, probing few of its lists, so probing shows in the answers;
    # filtered searches through FAISS's id selectors, not the small-set matmul
    if kind == "ivf":
        return IndexConfig(device=device, approx_threshold=400, min_nprobe=2, brute_force_below=0)
    return IndexConfig(device=device, brute_force_below=0)


def _pair(kind: str, device: str, n: int = 1_000) -> tuple[VectorIndex, VectorIndex]:
    """An index on `device` and one on the CPU, holding the same vectors."""
    rng = np.random.default_rng(7)
    vectors, ids = _unit(rng, n), rng.choice(100_000, size=n, replace=False).astype(np.int64)
    tested = VectorIndex(DIM, _config(kind, device))
    reference = VectorIndex(DIM, _config(kind, "cpu"))
    for index in (tested, reference):
        index.add(ids, vectors)
    assert tested.approximate == reference.approximate == (kind == "ivf")
    return tested, reference


def _same(got: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])


@pytest.fixture
def stand_in_gpu(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """FAISS's GPU build seeing one GPU, played by the CPU build: the real `GpuCopy` runs,
    over a CPU clone of the index; counts copies made and searches that reach a copy."""
    counts = SimpleNamespace(made=0, searches=0)

    def to_gpu(resources: Any, gpu: int, index: Any) -> Any:
        counts.made += 1
        return faiss.clone_index(index)

    search = faiss_device.GpuCopy.search

    def counted(self: faiss_device.GpuCopy, *args: Any) -> tuple[np.ndarray, np.ndarray]:
        counts.searches += 1
        return search(self, *args)

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss_device, "driver_gpus", lambda: 1)
    monkeypatch.setattr(faiss_device, "_resources", None)
    monkeypatch.setattr(faiss_device.GpuCopy, "search", counted)
    return counts


@cpu_faiss_only
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_auto_without_gpu_faiss_searches_on_the_cpu_with_identical_results(kind: str) -> None:
    auto, cpu = _pair(kind, "auto")
    assert not auto.on_gpu and not cpu.on_gpu
    queries = _unit(np.random.default_rng(1), 20)
    _same(auto.search(queries, 10), cpu.search(queries, 10))
    allowed = np.fromiter(sorted(cpu._ids), dtype=np.int64)[::3]
    _same(auto.search(queries, 10, allowed), cpu.search(queries, 10, allowed))


@cpu_faiss_only
def test_cuda_without_gpu_faiss_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    with pytest.raises(MissingExtraError, match=r"faiss-gpu>=1\.15.*device='cuda'"):
        VectorIndex(DIM, IndexConfig(device="cuda"))
    saved = tmp_path / "vectors.idx"
    index = VectorIndex(DIM)
    index.add(np.array([1, 2]), _unit(np.random.default_rng(0), 2))
    index.save(saved, applied_seq=3)
    before = saved.read_bytes()
    with pytest.raises(MissingExtraError, match="faiss-gpu"):
        VectorIndex.load(saved, IndexConfig(device="cuda:0"))
    assert saved.read_bytes() == before
    folder = tmp_path / "memory"
    with pytest.raises(MissingExtraError, match="faiss-gpu"):
        Memory(path=folder, index_config=IndexConfig(device="cuda"))
    assert not folder.exists()  # refused before a database was created


def test_a_gpu_faiss_cannot_see_is_refused_naming_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(faiss_device, "driver_gpus", lambda: 1)
    one_gpu = SimpleNamespace(StandardGpuResources=object, get_num_gpus=lambda: 1)
    assert faiss_device.gpu_for(one_gpu, "cuda") == 0
    assert faiss_device.gpu_for(one_gpu, "auto") == 0
    assert faiss_device.gpu_for(one_gpu, "cpu") is None
    with pytest.raises(InvalidInputError, match="sees 1") as caught:
        faiss_device.gpu_for(one_gpu, "cuda:1")
    assert caught.value.field == "device"
    no_gpu = SimpleNamespace(StandardGpuResources=object, get_num_gpus=lambda: 0)
    assert faiss_device.gpu_for(no_gpu, "auto") is None
    with pytest.raises(InvalidInputError):
        faiss_device.gpu_for(no_gpu, "cuda")


def test_without_faiss_the_error_names_both_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # neither faiss-cpu nor faiss-gpu
    with pytest.raises(MissingExtraError, match=r"faiss-cpu.*faiss-gpu>=1\.15.*never both"):
        VectorIndex(DIM)
    monkeypatch.setattr(threads, "_controller_instance", None)
    with threads.one_thread():  # thread limits need no FAISS
        pass


def test_without_a_cuda_driver_faiss_is_never_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    def aborts() -> int:  # what FAISS's GPU build does when asked without a working driver
        raise AssertionError("faiss.get_num_gpus called")

    gpu_build = SimpleNamespace(StandardGpuResources=object, get_num_gpus=aborts)
    monkeypatch.setattr(faiss_device, "driver_gpus", lambda: 0)
    assert faiss_device.gpu_count(gpu_build) == 0
    assert faiss_device.gpu_for(gpu_build, "auto") is None
    with pytest.raises(InvalidInputError, match="sees 0"):
        faiss_device.gpu_for(gpu_build, "cuda")
    monkeypatch.undo()
    assert faiss_device.driver_gpus() >= 0  # the real probe answers here, with or without CUDA


@pytest.mark.parametrize("device", ["tpu", "CUDA", "cuda:", "cuda:x", "cuda0", "", None, 0])
def test_bad_device_values_are_rejected(device: object) -> None:
    with pytest.raises(InvalidInputError) as caught:
        IndexConfig(device=device)
    assert caught.value.field == "device"


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_the_gpu_copy_answers_unfiltered_searches_and_follows_every_change(
    kind: str, stand_in_gpu: SimpleNamespace, tmp_path: Path
) -> None:
    gpu, cpu = _pair(kind, "auto")
    assert gpu.on_gpu and not cpu.on_gpu
    rng = np.random.default_rng(3)
    queries = _unit(rng, 20)
    assert stand_in_gpu.made == 0  # copied at the first search, not before
    _same(gpu.search(queries, 10), cpu.search(queries, 10))
    assert (stand_in_gpu.made, stand_in_gpu.searches) == (1, 1)

    allowed = np.fromiter(sorted(cpu._ids), dtype=np.int64)[::2]
    _same(gpu.search(queries, 10, allowed), cpu.search(queries, 10, allowed))
    _same(gpu.search(queries, faiss_device.GPU_MAX_K + 1), cpu.search(queries, 2049))
    assert stand_in_gpu.searches == 1  # filtered, and past the GPU's largest k: on the CPU

    fresh = np.arange(200_000, 200_050, dtype=np.int64)  # inserts reach the copy
    for index in (gpu, cpu):
        index.add(fresh, _unit(np.random.default_rng(4), 50))
    _same(gpu.search(queries, 10), cpu.search(queries, 10))
    assert stand_in_gpu.made == 1

    for index in (gpu, cpu):  # a removal, then a replacement, each drops the copy
        index.remove(fresh[:10])
    _same(gpu.search(queries, 10), cpu.search(queries, 10))
    for index in (gpu, cpu):
        index.add(fresh[10:12], _unit(np.random.default_rng(5), 2))
    _same(gpu.search(queries, 10), cpu.search(queries, 10))
    assert stand_in_gpu.made == 3

    gpu.save(tmp_path / "gpu.idx", applied_seq=1)  # the CPU index is what is saved
    loaded, _ = VectorIndex.load(tmp_path / "gpu.idx", _config(kind, "cpu"))
    _same(loaded.search(queries, 10), cpu.search(queries, 10))


def test_cuda_is_taken_where_faiss_sees_the_gpu(stand_in_gpu: SimpleNamespace) -> None:
    assert VectorIndex(DIM, IndexConfig(device="cuda")).on_gpu
    assert VectorIndex(DIM, IndexConfig(device="cuda:0")).on_gpu
    assert not VectorIndex(DIM, IndexConfig(device="cpu")).on_gpu
    with pytest.raises(InvalidInputError, match="sees 1") as caught:
        VectorIndex(DIM, IndexConfig(device="cuda:1"))
    assert caught.value.field == "device"


def test_retraining_drops_the_gpu_copy(stand_in_gpu: SimpleNamespace) -> None:
    gpu, cpu = _pair("flat", "auto", n=399)
    queries = _unit(np.random.default_rng(6), 20)
    gpu.search(queries, 10)
    more = _unit(np.random.default_rng(8), 10)
    for index in (gpu, cpu):
        index.config.approx_threshold = 400
        index.add(np.arange(300_000, 300_010), more)  # 409 vectors: trained as an IVF
    assert gpu.approximate and cpu.approximate
    _same(gpu.search(queries, 10), cpu.search(queries, 10))
    assert stand_in_gpu.made == 2


def test_index_types_without_a_gpu_version_stay_on_the_cpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert faiss_device.supported(faiss, faiss.IndexIDMap2(faiss.IndexFlatIP(DIM)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, 4, faiss.METRIC_INNER_PRODUCT)
    assert faiss_device.supported(faiss, ivf)
    faiss_device._warned.discard("IndexHNSWFlat")
    with caplog.at_level(logging.WARNING, logger=faiss_device.__name__):
        hnsw = faiss.IndexHNSWFlat(DIM, 16)
        for _ in range(2):
            assert not faiss_device.supported(faiss, hnsw)
            assert not faiss_device.supported(faiss, faiss.IndexIDMap2(hnsw))
    assert [r.getMessage().count("IndexHNSWFlat") for r in caplog.records] == [1]


def _same_up_to_ties(
    got: tuple[np.ndarray, np.ndarray],
    expected: tuple[np.ndarray, np.ndarray],
    rows_may_differ: float,
) -> None:
    """Per query, equal scores (to float tolerance) and the same ids wherever no near-tie
    could reorder them (a GPU sums inner products in another order than the CPU's BLAS); on
    an IVF a near-tie between two lists' centroids may change the lists probed, so a few
    queries may differ."""
    differ = 0
    for row in range(len(got[0])):
        clear = expected[0][row] > expected[0][row, -1] + 1e-4  # clear of the k-th score
        same_ids = set(got[1][row][clear]) == set(expected[1][row][clear])
        differ += not (same_ids and np.allclose(got[0][row], expected[0][row], atol=1e-4))
    assert differ <= rows_may_differ * len(got[0]), f"{differ} of {len(got[0])} queries differ"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_search_equals_cpu_faiss(kind: str, tmp_path: Path) -> None:
    if not GPU_FAISS:
        pytest.skip("FAISS here is the CPU build (install the gpu extra's faiss-gpu)")
    rng = np.random.default_rng(11)
    n, dim = 60_000, 64
    vectors, ids = _unit(rng, n, dim), rng.permutation(10 * n)[:n].astype(np.int64)
    threshold = 50_000 if kind == "ivf" else 10**9
    gpu = VectorIndex(dim, IndexConfig(device="cuda", approx_threshold=threshold))
    gpu.add(ids, vectors)
    gpu.save(tmp_path / "trained.idx", applied_seq=0)  # the reference: the same trained lists
    cpu, _ = VectorIndex.load(
        tmp_path / "trained.idx", IndexConfig(device="cpu", approx_threshold=threshold)
    )
    assert gpu.on_gpu and gpu.approximate == cpu.approximate == (kind == "ivf")
    may_differ = 0.02 if kind == "ivf" else 0.0
    queries = _unit(rng, 200, dim)
    _same_up_to_ties(gpu.search(queries, 10), cpu.search(queries, 10), may_differ)
    assert gpu._gpu_copy is not None  # the search ran on the GPU
    gpu.search(queries, 10)
    for index in (gpu, cpu):  # inserts reach the GPU copy
        index.add(np.arange(10 * n, 10 * n + 500), _unit(np.random.default_rng(12), 500, dim))
    _same_up_to_ties(gpu.search(queries, 100), cpu.search(queries, 100), may_differ)
    for index in (gpu, cpu):  # a removal drops the copy; the next search copies again
        index.remove(ids[:1_000])
    _same_up_to_ties(gpu.search(queries, 100), cpu.search(queries, 100), may_differ)
    gpu.save(tmp_path / "gpu.idx", applied_seq=1)
    loaded, _ = VectorIndex.load(tmp_path / "gpu.idx", IndexConfig(device="cpu"))
    _same(loaded.search(queries, 10), cpu.search(queries, 10))
