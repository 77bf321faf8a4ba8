"""Transparent huge pages for a page-locked host slab (Linux): fewer pages to lock and map.

A host slab behind a GPU is locked with `cudaHostRegister` as it grows; on 2 MB pages the
driver pins and maps 512 times fewer pages. Linux
backs a range with huge pages on its first touch when asked (`madvise(MADV_HUGEPAGE)`, the
default `madvise` mode of /sys/kernel/mm/transparent_hugepage/enabled). Elsewhere, or when
THP is off, nothing happens. (A plain RAM slab does not ask: see `TensorTier._empty`.)
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise, on Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask for huge pages under the whole 2 MB pages inside a CPU tensor not yet written (a
    fresh `torch.empty`); True when the kernel accepted the advice."""
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu" or tensor.is_pinned():
        return False
    begin = tensor.data_ptr()
    start = -(-begin // HUGE_PAGE) * HUGE_PAGE
    end = (begin + tensor.untyped_storage().nbytes()) // HUGE_PAGE * HUGE_PAGE
    return end > start and madvise(start, end - start, _MADV_HUGEPAGE) == 0
