"""Page-locked host slabs that are unpinned when freed, outside PyTorch's caching allocator.

`torch.empty(pin_memory=True)` rounds each block up to a power of two and keeps every freed
block pinned for reuse. A slab that grows by doubling then keeps all its earlier sizes
pinned: at 512K tokens of an 8B model's KV (56 GiB in RAM) that is 63 GiB more, and the
machine runs out of memory. Here a slab is plain memory registered with CUDA
(`cudaHostRegister`), huge-page advised before its first touch, and unregistered as its
storage is freed.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref

import numpy as np
import torch

from memlayer.stores.huge_pages import advise_huge_pages

log = logging.getLogger(__name__)

_lock = threading.Lock()
_registered = 0  # bytes page-locked through `pinned_empty` and not yet freed


def registered_bytes() -> int:
    """Bytes of host memory page-locked by live `pinned_empty` tensors."""
    return _registered


def _account(delta: int) -> None:
    global _registered
    with _lock:
        _registered += delta


def _unregister(address: int, nbytes: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)
    _account(-nbytes)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in page-locked memory (copies to the GPU run
    asynchronously); pageable, with a warning, when CUDA cannot lock that much."""
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(max(nbytes, 1), dtype=np.uint8)
    tensor = torch.from_numpy(buffer)[:nbytes].view(dtype).view(shape)
    advise_huge_pages(tensor)
    address = buffer.ctypes.data
    status = torch.cuda.cudart().cudaHostRegister(address, buffer.nbytes, 0)
    if int(status) != 0:
        log.warning(
            "could not page-lock a %d-byte host slab (CUDA error %d): it stays pageable, "
            "and copies from it to the GPU wait for the host",
            buffer.nbytes,
            int(status),
        )
        return tensor
    _account(buffer.nbytes)
    # the storage holds `buffer` until its last view is gone; numpy clears weak references
    # before it frees the memory, so the range is unregistered while it is still mapped
    weakref.finalize(buffer, _unregister, address, buffer.nbytes).atexit = False
    return tensor
