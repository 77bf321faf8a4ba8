"""Where the vector index searches: on a CUDA GPU through FAISS's GPU build, or on the CPU.

`IndexConfig.device` chooses: "cpu"; "cuda" (GPU 0) or "cuda:N", an error when FAISS cannot
search there; "auto" (the default), the first GPU when FAISS's GPU build (faiss-gpu, swapped in
for faiss-cpu) sees one, else the CPU. The CPU index stays the index: adds, removes, filtered
searches, reconstruction and saves use it, and a `GpuCopy` of it answers unfiltered top-k
searches. FAISS's GPU indexes take no id selectors and cannot remove ids, so a filtered search
runs on the CPU and a removal drops the copy (it is copied again at the next search); inserts
go to both. FAISS has GPU versions of the two index types the vector index builds (flat, and
IVF with exact vectors in its lists); another type (HNSW, say) stays on the CPU, logged once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from typing import Any

import numpy as np

from memlayer.errors import InvalidInputError, MissingExtraError

log = logging.getLogger(__name__)

# The largest k and nprobe FAISS's GPU top-k selection takes; a search past them runs on the CPU
GPU_MAX_K = 2048
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_INSTALL_GPU = (
    "pip uninstall -y faiss-cpu faiss-gpu && pip install 'faiss-gpu>=1.15' "
    "(IndexConfig.device={device!r} needs FAISS's CUDA build; the faiss installed is the CPU one)"
)

# One set of GPU resources per process, and one GPU FAISS call at a time: FAISS's GPU
# resources are not safe to use from two threads at once.
_lock = threading.Lock()
_resources: Any = None
_warned: set[str] = set()
_driver: dict[int, int] = {}  # process id -> GPUs the CUDA driver reports (a fork asks again)


def check_device(device: object) -> str:
    """`device` unchanged when it is "auto", "cpu", "cuda" or "cuda:N", else InvalidInputError."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise InvalidInputError("device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'", device)
    return device


def gpu_for(faiss: Any, device: str) -> int | None:
    """The GPU the index searches on for `device`, or None for the CPU.

    "cuda" asked of FAISS's CPU build raises MissingExtraError (the command to install the
    GPU build), and of a GPU build that sees no such GPU InvalidInputError naming `device`.
    """
    check_device(device)
    if device == "cpu":
        return None
    count = gpu_count(faiss)
    if device == "auto":
        return 0 if count > 0 else None
    if not hasattr(faiss, "StandardGpuResources"):
        raise MissingExtraError("faiss-gpu", install=_INSTALL_GPU.format(device=device))
    gpu = int(device.partition(":")[2] or 0)
    if gpu >= count:
        rule = f"names a GPU FAISS cannot see (it sees {count}); use 'auto' or 'cpu'"
        raise InvalidInputError("device", rule, device)
    return gpu


def gpu_count(faiss: Any) -> int:
    """GPUs FAISS can search on: 0 with its CPU build, and 0 where the CUDA driver reports
    none (FAISS's GPU build aborts the process when asked without a working driver)."""
    if not hasattr(faiss, "StandardGpuResources") or driver_gpus() == 0:
        return 0
    return int(faiss.get_num_gpus())


def driver_gpus() -> int:
    """GPUs the CUDA driver reports, asked through libcuda directly (its calls return error
    codes, where FAISS's abort): 0 without a driver, with one older than CUDA 12 (faiss-gpu's
    runtime), or in a process forked after CUDA started."""
    pid = os.getpid()
    if pid not in _driver:
        _driver[pid] = _ask_driver()
    return _driver[pid]


def _ask_driver() -> int:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return 0
    if version.value < 12_000 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def supported(faiss: Any, index: Any) -> bool:
    """Whether FAISS has a GPU version of `index` (flat behind an id map, or IVF-flat); the
    first unsupported type is logged once."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
    if isinstance(inner, faiss.IndexFlat) or isinstance(index, faiss.IndexIVFFlat):
        return True
    name = type(inner if inner is not None else index).__name__
    if name not in _warned:
        _warned.add(name)
        log.warning("FAISS has no GPU version of %s: the vector index searches on the CPU", name)
    return False


class GpuCopy:
    """A copy of a CPU FAISS index on one GPU, for unfiltered top-k search."""

    def __init__(self, faiss: Any, index: Any, gpu: int) -> None:
        global _resources

        self._faiss = faiss
        self._ivf = hasattr(index, "nlist")  # searched with SearchParametersIVF's nprobe
        with _lock:
            if _resources is None:
                _resources = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(_resources, gpu, index)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Insert vectors the CPU index took too (ids not already stored)."""
        with _lock:
            self._index.add_with_ids(vectors, ids)

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids); `nprobe` lists on an IVF, ignored on a flat index."""
        params = self._faiss.SearchParametersIVF(nprobe=nprobe) if self._ivf else None
        with _lock:
            return self._index.search(queries, k, params=params)
