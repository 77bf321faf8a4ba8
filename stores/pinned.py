"""Page-locked host slabs that are unpinned when freed, outside PyTorch's caching allocator.

`torch.empty(pin_memory=True)` rounds each block up to a power of two and keeps every freed
block pinned for reuse. A slab that grows by doubling then keeps all its earlier sizes
pinned: at 512K tokens of an 8B model's KV (56 GiB in RAM) that is 63 GiB more, and the
machine runs out of memory. Here a slab is plain memory registered with CUDA
(`cudaHostRegister`), huge-page advised before its first touch, and unregistered as its
storage is freed.

A large slab reserves address space instead (`pinned_reserve`) and page-locks only the rows
in use (`lock_rows`): growing is then a longer view, with no copy of the old rows, and each
page is first touched once. At each growth the rows in use are locked again as one range,
since CUDA refuses a copy that spans two registered ranges ("invalid argument", seen on an
H200); re-locking memory already written is cheaper than copying it.
"""

from __future__ import annotations

import logging
import math
import mmap
import sys
import threading
import weakref
from dataclasses import dataclass

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


def _cuda_register(address: int, nbytes: int) -> int:
    """cudaHostRegister: 0 when the range is now page-locked, else CUDA's error code."""
    return int(torch.cuda.cudart().cudaHostRegister(address, nbytes, 0))


def _cuda_unregister(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)


def _lock_range(address: int, nbytes: int) -> bool:
    """Page-lock a range; False, with a warning, where CUDA cannot lock that much."""
    status = _cuda_register(address, nbytes)
    if status != 0:
        log.warning(
            "could not page-lock %d bytes of a host slab (CUDA error %d): they stay pageable, "
            "and copies from them to the GPU wait for the host",
            nbytes,
            status,
        )
        return False
    _account(nbytes)
    return True


def _unlock_range(address: int, nbytes: int) -> None:
    _cuda_unregister(address)
    _account(-nbytes)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in page-locked memory (copies to the GPU run
    asynchronously); pageable, with a warning, when CUDA cannot lock that much."""
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(max(nbytes, 1), dtype=np.uint8)
    tensor = torch.from_numpy(buffer)[:nbytes].view(dtype).view(shape)
    advise_huge_pages(tensor)
    address = buffer.ctypes.data
    if _lock_range(address, buffer.nbytes):
        # the storage holds `buffer` until its last view is gone; numpy clears weak
        # references before it frees the memory, so the range is unregistered while mapped
        weakref.finalize(buffer, _unlock_range, address, buffer.nbytes).atexit = False
    return tensor


LOCK_STEP = 2 << 20  # bytes: a reservation is locked in whole huge pages
# Linux's MAP_NORESERVE (x86 and Arm): address space not counted against overcommit
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


@dataclass
class _Reservation:
    """A reserved mapping: its start, its length, and how much of it is locked (from the start)."""

    address: int
    nbytes: int
    locked: int = 0


_reservations: dict[int, _Reservation] = {}  # by start address, while mapped


def _cuda_synchronize() -> None:
    torch.cuda.synchronize()


def pinned_reserve(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Address space for `shape[0]` rows, nothing written or locked yet (`lock_rows` locks
    the rows a slab grows into). OSError where the mapping is refused."""
    nbytes = math.prod(shape) * dtype.itemsize
    length = max(-(-nbytes // LOCK_STEP) * LOCK_STEP, LOCK_STEP)
    mapping = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    buffer = np.frombuffer(mapping, dtype=np.uint8)
    tensor = torch.from_numpy(buffer)[:nbytes].view(dtype).view(shape)
    advise_huge_pages(tensor)
    reservation = _reservations[buffer.ctypes.data] = _Reservation(buffer.ctypes.data, length)
    # numpy clears weak references before it lets the mapping go: unlocked while mapped
    weakref.finalize(buffer, _release, reservation).atexit = False
    return tensor


def lock_rows(tensor: torch.Tensor, rows: int) -> None:
    """Page-lock the first `rows` rows of a `pinned_reserve` tensor (in whole LOCK_STEPs) as
    one range, replacing a shorter one; nothing for any other tensor. Where CUDA cannot lock
    that much, what was locked before stays locked."""
    reservation = _reservations.get(tensor.data_ptr())
    if reservation is None:
        return
    row_bytes = math.prod(tensor.shape[1:]) * tensor.dtype.itemsize
    end = min(-(-rows * row_bytes // LOCK_STEP) * LOCK_STEP, reservation.nbytes)
    previous = reservation.locked
    if end <= previous:
        return
    if previous:
        _cuda_synchronize()  # copies in flight from the locked rows end before they unlock
        _unlock_range(reservation.address, previous)
        reservation.locked = 0
    for size in (end, previous):
        if size and _lock_range(reservation.address, size):
            reservation.locked = size
            return


def _release(reservation: _Reservation) -> None:
    _reservations.pop(reservation.address, None)
    if reservation.locked:
        _unlock_range(reservation.address, reservation.locked)
