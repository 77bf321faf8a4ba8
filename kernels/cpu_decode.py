"""A layer's step for a few queries (a decode token) on the CPU, in one fused C call.

At one token the reference's dozen torch operations (a gathered copy of the pages, the
logits of every part, a concatenation, a softmax, four matmuls) cost more in fixed overhead
than in arithmetic. `cpu_decode.c` reads the window, the sinks and the pages in place (the
pages through their slots in the front tier's slab, in float32 or bfloat16) with an online
softmax, split over (KV head, range of keys) on torch's threads. It is compiled on first
use (`native.build`); where no compiler works, `handles` says no and dispatch keeps the
reference.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from memlayer.kernels import native

SOURCE = Path(__file__).with_name("cpu_decode.c")
MAX_ROWS = 64  # query heads per KV head x tokens (MAX_ROWS in the C source)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (`native.build`), or None where it cannot be built."""
    lib = native.build(SOURCE)
    if lib is None:
        return None
    fn = lib.memlayer_sparse_decode_f32
    pointer, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = [
        *(pointer,) * 4, i64, i32,  # q_local, q_memory, window k/v, head stride, length
        *(pointer,) * 2, i64, i32,  # sink k/v, head stride, count
        pointer, pointer, i32,  # pool k/v, bfloat16 or not
        pointer, pointer, i32, i32,  # slots, lengths, pages, page size
        i32, i32, i32, i32, ctypes.c_float, i32, pointer,  # heads .. threads, out
    ]  # fmt: skip
    fn.restype = i32
    for select in (lib.memlayer_select_summed_f32, lib.memlayer_select_bounds_f32):
        select.argtypes = [pointer, i32, i32, i32, i32, pointer, i32, i32, pointer]
        select.restype = i32
    put = lib.memlayer_window_put_f32
    put.argtypes = [pointer, pointer, i32, i32, i32, pointer, pointer, i64, i64, *(pointer,) * 3]
    put.restype = None
    layer = lib.memlayer_decode_layer_f32
    layer.argtypes = [
        *(pointer,) * 3, i64, i64,  # q_raw, cos, signed sin, local and memory table rows
        i32, pointer, i32, i32, pointer,  # kind, summaries, sealed pages, k, page table
        *(pointer,) * 2, i64, i32,  # window k/v, head stride, length
        *(pointer,) * 2, i64, i32,  # sink k/v, head stride, count
        pointer, pointer, i32, i32,  # pool k/v, bfloat16 or not, page size
        i32, i32, i32, i32, ctypes.c_float, i32, pointer,  # heads .. threads, out
    ]  # fmt: skip
    layer.restype = i32
    return lib


def _rows_contiguous(t: torch.Tensor) -> bool:
    """[B, H, n, D] with each head's rows packed (heads may be any stride apart)."""
    return t.stride(-1) == 1 and (t.shape[2] <= 1 or t.stride(2) == t.shape[3])


def _packed(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [1, H, n, D] as the kernel reads them: rows packed, heads the same
    stride apart in both (views of a layer's buffers already are; anything else is copied)."""
    if _rows_contiguous(keys) and keys.stride() == values.stride():
        return keys, values
    return keys.contiguous(), values.contiguous()


def handles(q_local: torch.Tensor, window_k: torch.Tensor, k_pool: torch.Tensor) -> bool:
    """True for a CPU float32 step of batch 1 (pages float32 or bfloat16) whose rows fit the
    kernel, when it is built."""
    batch, heads, tokens, dim = q_local.shape
    return (
        q_local.device.type == "cpu"
        and q_local.dtype == window_k.dtype == torch.float32
        and k_pool.dtype in (torch.float32, torch.bfloat16)
        and batch == 1
        and dim % 16 == 0
        and dim <= 256
        and heads // window_k.shape[1] * tokens <= MAX_ROWS
        and available()
    )


_BUILT: dict[str, bool] = {}  # "ok": whether library() built, once it has been asked


def available() -> bool:
    """Whether the kernel is built; after the first answer a plain lookup, which a compiled
    graph reads as a constant instead of tracing the build."""
    if "ok" not in _BUILT:
        _BUILT["ok"] = library() is not None
    return _BUILT["ok"]


def sparse_attention(
    q_local: torch.Tensor,
    window_k: torch.Tensor,
    window_v: torch.Tensor,
    q_memory: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_idx: torch.Tensor,
    *,
    scale: float,
    padded: bool = True,
    page_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """`reference.sparse_attention` in one call (same arguments; slots of -1 are skipped
    whatever `padded` says). Eager steps call the kernel directly (the operator's dispatch
    costs about 16 µs a call, half a millisecond a token over 30 layers); a compiled graph
    holds it as the operator `memlayer::sparse_decode`."""
    call = _sparse_decode if torch.compiler.is_compiling() else _decode
    out: torch.Tensor = call(
        q_local, window_k, window_v, q_memory, sink_k, sink_v, k_pool, v_pool, page_idx,
        page_lengths, scale
    )  # fmt: skip
    return out


def _decode(
    q_local: torch.Tensor,
    window_k: torch.Tensor,
    window_v: torch.Tensor,
    q_memory: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_idx: torch.Tensor,
    page_lengths: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The C call."""
    lib = library()
    assert lib is not None
    _, heads, tokens, dim = q_local.shape
    q_local = q_local.contiguous()
    q_memory = q_memory.contiguous()
    window_k, window_v = _packed(window_k, window_v)
    sink_k, sink_v = _packed(sink_k, sink_v)
    k_pool, v_pool = k_pool.contiguous(), v_pool.contiguous()
    slots = page_idx.contiguous()
    lengths = None if page_lengths is None else page_lengths.to(torch.long).contiguous()
    out = torch.empty_like(q_local)
    failed = lib.memlayer_sparse_decode_f32(
        q_local.data_ptr(),
        q_memory.data_ptr(),
        window_k.data_ptr(),
        window_v.data_ptr(),
        window_k.stride(1),
        window_k.shape[2],
        sink_k.data_ptr(),
        sink_v.data_ptr(),
        sink_k.stride(1),
        sink_k.shape[2],
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        int(k_pool.dtype == torch.bfloat16),
        slots.data_ptr(),
        None if lengths is None else lengths.data_ptr(),
        slots.shape[2],
        k_pool.shape[2],
        heads,
        window_k.shape[1],
        tokens,
        dim,
        scale,
        torch.get_num_threads(),
        out.data_ptr(),
    )
    if failed:
        raise MemoryError("cpu_decode: out of memory for the step's scratch")
    return out


_sparse_decode = torch.library.custom_op("memlayer::sparse_decode", mutates_args=())(_decode)


@_sparse_decode.register_fake
def _(q_local: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty_like(q_local, memory_format=torch.contiguous_format)


BOUNDS_MAX_TOKENS = 8  # queries a step; a longer chunk's bounds are a matmul per KV head in torch


def handles_selection(q: torch.Tensor, summary: torch.Tensor) -> bool:
    """True for a CPU float32 selection of batch 1 over one summary row per page and KV
    head ([P, Hkv, 1, D], rows packed), when the kernel is built."""
    return _selectable(q, summary, rows=1)


def handles_bounds(q: torch.Tensor, summary: torch.Tensor) -> bool:
    """True for a CPU float32 Quest selection of batch 1 and at most BOUNDS_MAX_TOKENS
    queries over (min, max) rows ([P, Hkv, 2, D], packed), when the kernel is built."""
    return q.shape[2] <= BOUNDS_MAX_TOKENS and _selectable(q, summary, rows=2)


def _selectable(q: torch.Tensor, summary: torch.Tensor, rows: int) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype == summary.dtype == torch.float32
        and q.shape[0] == 1
        and summary.shape[2] == rows
        and q.shape[-1] % 16 == 0
        and summary.is_contiguous()
        and available()
    )


def select_pages_summed(q: torch.Tensor, summary: torch.Tensor, k: int) -> torch.Tensor:
    """`reference.select_pages_summed` in one C call (same arguments; of pages scoring the
    same, the lower index wins)."""
    call = _select_summed if torch.compiler.is_compiling() else _summed
    out: torch.Tensor = call(q, summary, k)
    return out


def select_pages_bounds(q: torch.Tensor, summary: torch.Tensor, k: int) -> torch.Tensor:
    """`reference.select_pages_bounds` in one C call (same arguments; of pages scoring the
    same, the lower index wins)."""
    call = _select_bounds if torch.compiler.is_compiling() else _bounds
    out: torch.Tensor = call(q, summary, k)
    return out


def _selection(
    kernel: str, q: torch.Tensor, summary: torch.Tensor, k: int, heads: int
) -> torch.Tensor:
    """Pages [1, heads, k] from the C selection `kernel` (same arguments for both)."""
    lib = library()
    assert lib is not None
    _, query_heads, tokens, dim = q.shape
    q = q.contiguous()
    out = torch.empty(1, heads, k, dtype=torch.long)
    failed = getattr(lib, kernel)(
        q.data_ptr(), query_heads, tokens, summary.shape[1], dim, summary.data_ptr(),
        summary.shape[0], k, out.data_ptr(),
    )  # fmt: skip
    if failed:
        raise MemoryError("cpu_decode: out of memory for the selection's scratch")
    return out


def _summed(q: torch.Tensor, summary: torch.Tensor, k: int) -> torch.Tensor:
    """The summed-score C call: one selection for every KV head."""
    return _selection("memlayer_select_summed_f32", q, summary, k, heads=1)


def _bounds(q: torch.Tensor, summary: torch.Tensor, k: int) -> torch.Tensor:
    """Quest's C call: a selection per KV head."""
    return _selection("memlayer_select_bounds_f32", q, summary, k, heads=summary.shape[1])


_select_summed = torch.library.custom_op("memlayer::select_summed", mutates_args=())(_summed)
_select_bounds = torch.library.custom_op("memlayer::select_bounds", mutates_args=())(_bounds)


@_select_summed.register_fake
def _(q: torch.Tensor, summary: torch.Tensor, k: int) -> torch.Tensor:
    return q.new_empty((1, 1, k), dtype=torch.long)


@_select_bounds.register_fake
def _(q: torch.Tensor, summary: torch.Tensor, k: int) -> torch.Tensor:
    return q.new_empty((1, summary.shape[1], k), dtype=torch.long)


SELECTIONS = {"summed": 0, "bounds": 1}  # the C step's selection kinds


def handles_window_put(keys: torch.Tensor, buffer: torch.Tensor) -> bool:
    """True for a few CPU float32 tokens' keys [Hkv, T, D] into float32 window buffers whose
    head size the kernel takes, when it is built (a prefill chunk stays in torch)."""
    return (
        keys.device.type == "cpu"
        and keys.dtype == buffer.dtype == torch.float32
        and keys.shape[1] <= BOUNDS_MAX_TOKENS
        and keys.shape[-1] % 2 == 0
        and buffer.stride(-1) == 1
        and buffer.stride(1) == buffer.shape[2]
        and available()
    )


def window_put(
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor],
    first: int,
    buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    at: int,
) -> None:
    """Write keys and values [Hkv, T, D] at index `at` of a window's buffers (raw, rotated,
    values: [Hkv, capacity, D]), the keys rotated at rows first .. first + T - 1 of `tables`
    (cos, signed sin [N, D], `Rotary`'s): `WindowBuffer.append`'s writes in one C call."""
    lib = library()
    assert lib is not None
    heads, tokens, dim = keys.shape
    keys, values = keys.contiguous(), values.contiguous()
    raw, rot, val = buffers
    offset = at * dim * raw.element_size()
    lib.memlayer_window_put_f32(
        keys.data_ptr(), values.data_ptr(), heads, tokens, dim, tables[0].data_ptr(),
        tables[1].data_ptr(), first, raw.stride(0), raw.data_ptr() + offset,
        rot.data_ptr() + offset, val.data_ptr() + offset,
    )  # fmt: skip


def handles_layer(
    q_raw: torch.Tensor, window_k: torch.Tensor, k_pool: torch.Tensor, summaries: torch.Tensor
) -> bool:
    """True when `decode_layer` takes this step (window [Hkv, n, D]): at most
    BOUNDS_MAX_TOKENS queries (where the separate selections are C calls too), `handles`'
    conditions, and float32 summaries with their rows packed."""
    return (
        q_raw.shape[2] <= BOUNDS_MAX_TOKENS
        and summaries.dtype == torch.float32
        and summaries.is_contiguous()
        and handles(q_raw, window_k[None], k_pool)
    )


def decode_layer(
    q_raw: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor],
    local_at: int,
    memory_at: int | None,
    selection: str,
    summaries: torch.Tensor,
    k: int,
    table: torch.Tensor,
    window_k: torch.Tensor,
    window_v: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """A resident layer's whole decode step in one C call: unrotated queries [1, Hq, T, D]
    rotated at rows `local_at` .. of `tables` (cos, signed sin) for the window and at row
    `memory_at` for memory (None: the window's), the top-`k` pages by `selection` ("summed"
    or "bounds") of `summaries` [P, Hkv, R, D], their slots from `table` [P], then
    `sparse_attention` over window [Hkv, n, D], sinks and the slab's pages. The same numbers
    as those steps taken one by one."""
    lib = library()
    assert lib is not None
    _, heads, tokens, dim = q_raw.shape
    q_raw = q_raw.contiguous()
    window_k, window_v = _packed(window_k[None], window_v[None])
    sink_k, sink_v = _packed(sink_k[None], sink_v[None])
    out = torch.empty_like(q_raw)
    failed = lib.memlayer_decode_layer_f32(
        q_raw.data_ptr(), tables[0].data_ptr(), tables[1].data_ptr(), local_at,
        -1 if memory_at is None else memory_at, SELECTIONS[selection], summaries.data_ptr(),
        summaries.shape[0], k, table.data_ptr(),
        window_k.data_ptr(), window_v.data_ptr(), window_k.stride(1), window_k.shape[2],
        sink_k.data_ptr(), sink_v.data_ptr(), sink_k.stride(1), sink_k.shape[2],
        k_pool.data_ptr(), v_pool.data_ptr(), int(k_pool.dtype == torch.bfloat16),
        k_pool.shape[2], heads, window_k.shape[1], tokens, dim, scale,
        torch.get_num_threads(), out.data_ptr(),
    )  # fmt: skip
    if failed:
        raise MemoryError("cpu_decode: out of memory for the step's scratch")
    return out
