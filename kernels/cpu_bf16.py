"""Attention of a prefill chunk's grouped queries with bfloat16 products, on CPUs that have
AVX512-BF16 (`KVConfig(attention_dtype="bfloat16")`).

The products of a float32 flash attention are most of a CPU prefill's attention time; the
dot instruction of AVX512-BF16 takes bfloat16 pairs and accumulates in float32 at twice the
float32 rate; where the CPU has AMX-BF16, its tiles take the products instead, 16 rows by 64
keys at a time (`tiles`). `cpu_bf16.c` rounds queries, keys, values and the softmax's
probabilities to bfloat16 and keeps everything else in float32 (the logits, the running
softmax, the output): the numerics of a bfloat16 flash attention on a GPU. A causal part
skips the key blocks no row of a block sees. Quest's page scores for a chunk (the largest
upper bound over its query rows) take the same products (`bounds_scores`; the tiles are 8×
the AVX512 loop at 500 pages); given the selection's k, only the pages that can reach a
head's top k are scored (groups of 8 pages bounded first). Compiled on first use
(`native.build`); where the CPU or the compiler lacks AVX512-BF16, `available` is False and
float32 runs.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from memlayer.kernels import native

SOURCE = Path(__file__).with_name("cpu_bf16.c")
MAX_DIM = 256  # MAX_DIM in the C source; head_dim must also be a multiple of 64


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built or the CPU lacks AVX512-BF16."""
    lib = native.build(SOURCE)
    if lib is None or not lib.memlayer_bf16_available():
        return None
    fn = lib.memlayer_attend_bf16
    pointer, i32 = ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [pointer, i32, i32, i32, i32, i32, ctypes.c_float, i32, pointer, pointer]
    fn.restype = i32
    bounds = lib.memlayer_bounds_bf16
    bounds.argtypes = [pointer, i32, pointer, i32, i32, i32, i32, pointer]
    bounds.restype = i32
    pruned = lib.memlayer_bounds_pruned_bf16
    pruned.argtypes = [pointer, i32, pointer, i32, i32, i32, i32, i32, pointer]
    pruned.restype = i32
    lib.memlayer_bf16_tiles.argtypes = [ctypes.c_int]
    lib.memlayer_bf16_tiles.restype = ctypes.c_int
    merge = lib.memlayer_merge_bf16
    merge.argtypes = [pointer, i32, i32, i32, i32, i32, i32, pointer, pointer]
    merge.restype = i32
    return lib


def available() -> bool:
    """Whether bfloat16 products can run here."""
    return library() is not None


def handles(q: torch.Tensor) -> bool:
    """True for float32 CPU queries [1, H, T, D] whose head_dim the kernel takes, when built."""
    dim = q.shape[-1]
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and q.shape[0] == 1
        and dim % 64 == 0
        and dim <= MAX_DIM
        and available()
    )


def handles_bounds(q: torch.Tensor, summary: torch.Tensor) -> bool:
    """True for CPU queries [1, Hq, T, D] and float32 (min, max) summaries [P, Hkv, 2, D]
    whose [q⁻, q⁺] rows the kernel takes, when built."""
    dim = q.shape[-1]
    return (
        q.device.type == "cpu"
        and q.shape[0] == 1
        and summary.dtype == torch.float32
        and summary.shape[2] == 2
        and (2 * dim) % 64 == 0
        and 2 * dim <= MAX_DIM
        and available()
    )


def use_tiles(wanted: bool) -> bool:
    """Let the kernel's products take AMX tiles (the default, where the CPU has AMX-BF16, the
    compiler targets it and Linux grants the tile state) or not (AVX512-BF16 alone): whether
    they take them now."""
    lib = library()
    return lib is not None and bool(lib.memlayer_bf16_tiles(int(wanted)))


def tiles() -> bool:
    """Whether the kernel's products take AMX tiles."""
    lib = library()
    return lib is not None and bool(lib.memlayer_bf16_tiles(-1))


PRUNE_FROM = 512  # pages from which `bounds_scores(k=...)` skips the groups that cannot win


def bounds_scores(q: torch.Tensor, summary: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """`reference.score_pages(kind="bounds")` [1, Hkv, P] with bfloat16 products: per KV
    head, the largest [q⁻, q⁺]·[min, max] over the group's query rows.

    With `k` (and at least PRUNE_FROM pages), only the scores that can reach a head's top k
    are computed, the others are -inf: groups of 8 pages are bounded first, and a group whose
    bound is below the k-th best score found is skipped (its pages cannot beat it), so the
    top k of these scores is the top k of the full ones at a fraction of the products."""
    lib = library()
    assert lib is not None
    pages, kv_heads, _, dim = summary.shape
    rows = q.float().reshape(kv_heads, -1, dim).contiguous()
    summary = summary.contiguous()
    out = torch.empty(1, kv_heads, pages, dtype=torch.float32)
    threads = torch.get_num_threads()
    if k is not None and pages >= PRUNE_FROM and k < pages:
        code = lib.memlayer_bounds_pruned_bf16(
            rows.data_ptr(), rows.shape[1], summary.data_ptr(), pages, kv_heads, dim, k,
            threads, out.data_ptr(),
        )  # fmt: skip
    elif pages:
        code = lib.memlayer_bounds_bf16(
            rows.data_ptr(), rows.shape[1], summary.data_ptr(), pages, kv_heads, dim, threads,
            out.data_ptr(),
        )  # fmt: skip
    else:
        code = 0
    if code:
        raise MemoryError(f"memlayer_bounds_bf16 failed (code {code})")
    return out


class _Part(ctypes.Structure):
    """part_t in the C source: one set of query rows against one set of keys and values."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("kv_stride", ctypes.c_int64),
        ("causal", ctypes.c_int64),
        ("keys", ctypes.c_int),
        ("bf16", ctypes.c_int),
    ]


Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]  # q, k, v, causal
MAX_PARTS = 8  # the C source's bound


def attend_parts(
    parts: Sequence[Part], *, tokens: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [1, Hkv, R, D] float32, log-sum-exp [1, Hkv, R]) of attention over every part's
    keys in one softmax. A part is grouped queries q [1, Hkv, R, D] (row r is token r %
    `tokens`; the parts may place them differently), keys and values [1, Hkv, N, D] (float32
    or bfloat16) and `causal`: None, or row r sees key n only where n <= causal + r % tokens.
    A row that sees no key gets 0 and a log-sum-exp of -inf."""
    lib = library()
    assert lib is not None and 0 < len(parts) <= MAX_PARTS
    _, kv_heads, rows, dim = parts[0][0].shape
    held, table = [], (_Part * len(parts))()
    for slot, (q, k, v, causal) in zip(table, parts, strict=True):
        q = q.contiguous()
        packed = k.stride(-1) == 1 and k.stride(-2) == dim and k.stride() == v.stride()
        if not packed or k.dtype != v.dtype:
            k, v = k.contiguous(), v.to(k.dtype).contiguous()
        held += [q, k, v]
        slot.q, slot.k, slot.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
        slot.kv_stride, slot.keys = k.stride(1), k.shape[2]
        slot.causal = -1 if causal is None else causal
        slot.bf16 = int(k.dtype == torch.bfloat16)
    out = torch.empty(1, kv_heads, rows, dim, dtype=torch.float32)
    lse = torch.empty(1, kv_heads, rows, dtype=torch.float32)
    code = lib.memlayer_attend_bf16(
        table, len(parts), rows, tokens, kv_heads, dim, scale, torch.get_num_threads(),
        out.data_ptr(), lse.data_ptr(),
    )  # fmt: skip
    if code:
        raise MemoryError(f"memlayer_attend_bf16 failed (code {code})")
    return out, lse


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tokens: int,
    scale: float,
    causal: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend_parts` of one part."""
    return attend_parts([(q, k, v, causal)], tokens=tokens, scale=scale)


class _MergePart(ctypes.Structure):
    _fields_ = [
        ("out", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("hs", "gs", "ts", "lhs", "lgs", "lts")),
    ]


def merge(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]], *, kv_heads: int, tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact softmax merge of attentions over disjoint key sets, in one pass: (out
    [1, Hkv, G·T, D] float32, log-sum-exp [1, Hkv, G·T]) from parts (out, lse) in bfloat16
    and float32. A part is grouped, out [1, Hkv, G·T, D] and lse [1, Hkv, G·T], or per query
    head, [1, Hkv·G, T, D] and [1, Hkv·G, T]; any strides (torch's flash attention returns
    its output transposed)."""
    lib = library()
    assert lib is not None and 0 < len(parts) <= MAX_PARTS
    dim = parts[0][0].shape[-1]
    rows = parts[0][0].shape[1] * parts[0][0].shape[2]
    groups = rows // (kv_heads * tokens)
    table = (_MergePart * len(parts))()
    for slot, (out, lse) in zip(table, parts, strict=True):
        if out.dtype != torch.bfloat16 or lse.dtype != torch.float32 or out.stride(-1) != 1:
            raise ValueError("merge takes bfloat16 outputs with unit-stride rows, float32 lses")
        slot.out, slot.lse = out.data_ptr(), lse.data_ptr()
        if out.shape[1] == kv_heads:  # grouped: row r = g·T + t
            slot.hs, slot.gs, slot.ts = out.stride(1), tokens * out.stride(2), out.stride(2)
            slot.lhs, slot.lgs, slot.lts = lse.stride(1), tokens * lse.stride(2), lse.stride(2)
        else:  # per query head: head h·G + g
            slot.hs, slot.gs, slot.ts = groups * out.stride(1), out.stride(1), out.stride(2)
            slot.lhs, slot.lgs, slot.lts = groups * lse.stride(1), lse.stride(1), lse.stride(2)
    merged = torch.empty(1, kv_heads, groups * tokens, dim, dtype=torch.float32)
    total = torch.empty(1, kv_heads, groups * tokens, dtype=torch.float32)
    code = lib.memlayer_merge_bf16(
        table, len(parts), kv_heads, groups, tokens, dim, torch.get_num_threads(),
        merged.data_ptr(), total.data_ptr(),
    )  # fmt: skip
    if code:
        raise ValueError(f"memlayer_merge_bf16 failed (code {code})")
    return merged, total
