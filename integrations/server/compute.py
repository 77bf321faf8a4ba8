"""A service worker's numeric libraries (torch, BLAS, OpenMP) on `compute_threads` threads.

A worker serves many requests at once, and other workers run beside it; a thread team inside
one request's embedding or search gains little (a single query is small work) and, when the
other cores are busy, waits at its barrier for one to come free: on the project's 2-core VM
with one core busy, a one-query MiniLM embedding took 34-675 ms p50 on torch's two threads
against 17-41 ms on one (RESULTS.md, "Memory service under load"). So `memlayer serve` runs
each worker's numeric libraries single-threaded unless told otherwise.
"""

from __future__ import annotations

import os
import sys

_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def limit_compute_threads(count: int) -> None:
    """Numeric libraries on `count` threads in this process: the environment, for libraries
    loaded and threads started from now on (an OpenMP runtime reads it when it loads; each
    new thread starts from it); threadpoolctl for the BLAS and OpenMP already loaded; torch's
    own setting when torch is loaded. Call again after loading a model."""
    from threadpoolctl import threadpool_limits

    for name in _VARIABLES:
        os.environ[name] = str(count)
    threadpool_limits(count)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)
