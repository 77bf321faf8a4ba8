"""Page-locked host slabs that are unpinned when freed, outside PyTorch's caching allocator.

`torch.empty(pin_memory=True)` rounds each block up to a power of two and keeps every freed
block pinned for reuse. A slab that grows by doubling then keeps all its earlier sizes
pinned: at 512K tokens of an 8B model's KV (56 GiB in RAM) that is 63 GiB more, and the
machine runs out of memory. Here a slab is plain memory registered with CUDA
(`cudaHostRegister`), huge-page advised before its first touch, and unregistered as its
storage is freed.

A large slab reserves address space instead (`pinned_reserve`) and page-locks only the rows
in use (`lock_rows`): growing is then a longer view, with no copy of the old rows, and each
page is first touched and locked once. Each growth locks its new rows as one more range,
starting on a row: CUDA refuses a copy that spans two registered ranges ("invalid argument",
seen on an H200), so copies split at `range_starts`. (Locking all the rows in use again at
each growth, as this once did, cost 4.2 of 34.5 s of a 128K prefill on an H200.)
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import mmap
import sys
import threading
import weakref
from dataclasses import dataclass, field

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


LOCK_STEP = 2 << 20  # bytes: a reservation is locked in whole huge pages where rows allow
_PAGE = 4096
# Linux's MAP_NORESERVE (x86 and Arm): address space not counted against overcommit
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


@dataclass
class _Reservation:
    """A reserved mapping: its start, its length, and the ranges locked in it, in order from
    its start with no gap: (offset, bytes) each."""

    address: int
    nbytes: int
    ranges: list[tuple[int, int]] = field(default_factory=list)

    @property
    def locked(self) -> int:
        """Bytes locked from the start."""
        return sum(size for _, size in self.ranges)


_reservations: dict[int, _Reservation] = {}  # by start address, while mapped


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
    """Page-lock at least the first `rows` rows of a `pinned_reserve` tensor: the rows past
    those locked already, as one more range that ends on a row and on a page (within a
    LOCK_STEP past them where rows allow); nothing for any other tensor. Where CUDA cannot
    lock that much, the rows locked before stay locked and the rest stay pageable."""
    reservation = _reservations.get(tensor.data_ptr())
    if reservation is None:
        return
    row_bytes = math.prod(tensor.shape[1:]) * tensor.dtype.itemsize
    start = reservation.locked
    if rows * row_bytes <= start:
        return
    unit = max(LOCK_STEP // math.gcd(row_bytes, LOCK_STEP), 1)  # rows ending on a LOCK_STEP
    if unit * row_bytes > 4 * LOCK_STEP:
        unit = _PAGE // math.gcd(row_bytes, _PAGE)  # rows ending on a page
    end = min(-(-rows // unit) * unit * row_bytes, reservation.nbytes)
    if _lock_range(reservation.address + start, end - start):
        reservation.ranges.append((start, end - start))


def range_starts(tensor: torch.Tensor) -> list[int]:
    """Rows of a `pinned_reserve` tensor at which a locked range after the first begins (a
    copy to or from the GPU must not span one); [] for any other tensor."""
    reservation = _reservations.get(tensor.data_ptr())
    if reservation is None or tensor.dim() == 0:
        return []
    row_bytes = tensor[0].nbytes if tensor.shape[0] else 1
    return [offset // row_bytes for offset, _ in reservation.ranges[1:]]


def fully_locked(tensor: torch.Tensor) -> bool:
    """Whether every byte of `tensor` is page-locked (a GPU kernel may read any of it)."""
    reservation = _reservations.get(tensor.data_ptr())
    if reservation is not None:
        return reservation.locked >= tensor.nbytes
    return tensor.is_pinned()


def _release(reservation: _Reservation) -> None:
    _reservations.pop(reservation.address, None)
    for offset, size in reservation.ranges:
        _unlock_range(reservation.address + offset, size)


def device_rows(
    tensor: torch.Tensor, device: torch.device, words: torch.dtype
) -> torch.Tensor | None:
    """The rows of a page-locked host tensor as seen from the GPU `device`: [rows, row bytes /
    word] of the integer type `words` (see `word_dtype`), over the same memory (zero copy). A
    kernel gathering from it reads the host's rows over the bus, so a scattered promotion is
    one kernel instead of one copy per run of rows. None where the tensor is not page-locked,
    not contiguous, or the driver gives no device address for it."""
    if (
        tensor.device.type != "cpu"
        or device.type != "cuda"
        or tensor.dim() == 0
        or not tensor.is_contiguous()
        or not fully_locked(tensor)
    ):
        return None
    address = _device_address(tensor.data_ptr())
    if address is None:
        return None
    shape = (tensor.shape[0], tensor[0].nbytes // words.itemsize)
    view = torch.as_tensor(_CudaArray(address, shape, _TYPESTR[words]))
    same = view.device.type == "cuda" and device.index in (None, view.device.index)
    return view if same else None


def word_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The widest integer type whose words tile each row of `tensor` and its start."""
    row_bytes = tensor[0].nbytes if tensor.dim() else tensor.nbytes
    return next(
        dtype
        for dtype in _TYPESTR
        if row_bytes % dtype.itemsize == 0 and tensor.data_ptr() % dtype.itemsize == 0
    )


_TYPESTR = {torch.int64: "<i8", torch.int32: "<i4", torch.int16: "<i2", torch.uint8: "|u1"}


@dataclass
class _CudaArray:
    """Device memory described by the CUDA array interface, for `torch.as_tensor`."""

    address: int
    shape: tuple[int, int]
    typestr: str

    @property
    def __cuda_array_interface__(self) -> dict[str, object]:
        return {
            "shape": self.shape,
            "typestr": self.typestr,
            "data": (self.address, False),
            "version": 3,
        }


@functools.cache
def _driver() -> ctypes.CDLL | None:
    """The CUDA driver library (loaded once torch has CUDA up), or None where it is absent."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    driver.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    driver.cuPointerGetAttribute.restype = ctypes.c_int
    return driver


_CU_POINTER_ATTRIBUTE_DEVICE_POINTER = 3


def _device_address(address: int) -> int | None:
    """The address through which GPU kernels reach this page-locked host address (the same
    one on most machines), or None where the driver does not map it."""
    driver = _driver()
    if driver is None:
        return None
    found = ctypes.c_uint64()
    status = driver.cuPointerGetAttribute(
        ctypes.byref(found), _CU_POINTER_ATTRIBUTE_DEVICE_POINTER, address
    )
    return int(found.value) if status == 0 else None
