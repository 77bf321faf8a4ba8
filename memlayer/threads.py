"""Run small numeric work on one thread.

Clustering a few hundred vectors takes milliseconds on one core, but numpy's BLAS and FAISS's
OpenMP split each small product over every core; on a busy machine a thread team waits for
a core to come free and the same work takes 10-100x longer (measured: 30 ms against 2.4 s on
a loaded 2-core VM). Part of the ground. `one_thread` limits the whole process (BLAS pools
are process-wide): nested and concurrent users share one limit, the first to enter sets it,
the last to leave restores the process's thread counts. `faiss_threads` sets only FAISS's on
the calling thread (OpenMP keeps a thread count per calling thread), for hot paths that must
not touch other threads' settings.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

_lock = threading.Lock()
_users = 0
_limit: Any = None


@contextmanager
def one_thread() -> Iterator[None]:
    """BLAS and OpenMP (numpy, FAISS, torch) on one thread inside the block."""
    global _users, _limit
    with _lock:
        if _users == 0:
            _limit = _controller().limit(limits=1)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _limit.restore_original_limits()
                _limit = None


def _controller() -> Any:
    """One ThreadpoolController, made once the numeric libraries are loaded."""
    global _controller_instance
    if _controller_instance is None:
        from threadpoolctl import ThreadpoolController

        with suppress(ImportError):  # load FAISS's OpenMP runtime so the controller sees it
            import faiss  # noqa: F401

        _controller_instance = ThreadpoolController()
    return _controller_instance


_controller_instance: Any = None


@contextmanager
def faiss_threads(count: int | None) -> Iterator[None]:
    """FAISS's OpenMP on `count` threads for the calling thread inside the block (None: as
    it is); other threads keep their own setting, and the caller's is restored after."""
    import faiss

    if count is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
