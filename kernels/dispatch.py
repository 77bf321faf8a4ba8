"""Kernel dispatch: Triton for CUDA tensors when triton imports, the torch reference otherwise;
a layer's step over a CPU chunk of many queries (a prefill) through PyTorch's CPU flash
attention (`cpu_flash.py`), and over a few queries (a decode token) in one fused C call
(`cpu_decode.py`, compiled on first use; the reference where no C compiler works).

MEMLAYER_KERNELS=reference forces the reference. The Triton module (and triton itself) is
imported on the first CUDA call only, so importing memlayer.kernels never touches either.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from memlayer.kernels import cpu_bf16, cpu_decode, cpu_flash, reference
from memlayer.kernels.reference import SummaryKind


@functools.cache
def _triton_kernels() -> ModuleType | None:
    """The Triton kernel module, or None when triton is not importable (imported once)."""
    try:
        from memlayer.kernels import triton_paged
    except ImportError:
        return None
    return triton_paged


def _forced_reference() -> bool:
    return os.environ.get("MEMLAYER_KERNELS", "auto") == "reference"


def _backend(tensor: torch.Tensor) -> ModuleType:
    """Module whose kernels run on `tensor`: Triton on CUDA unless forced to the reference."""
    if tensor.is_cuda and not _forced_reference():
        return _triton_kernels() or reference
    return reference


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_idx: torch.Tensor,
    *,
    scale: float,
    page_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the pool pages in page_idx; see reference.paged_attention."""
    out: tuple[torch.Tensor, torch.Tensor] = _backend(q).paged_attention(
        q, k_pool, v_pool, page_idx, scale=scale, page_lengths=page_lengths
    )
    return out


def causal_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over a window; see reference.causal_window_attention."""
    backend = _backend(q) if q.shape[0] == 1 else reference  # Triton's twin takes batch 1
    out: tuple[torch.Tensor, torch.Tensor] = backend.causal_window_attention(
        q, k, v, scale=scale, q_start=q_start
    )
    return out


def score_pages(q: torch.Tensor, summary: torch.Tensor, *, kind: SummaryKind) -> torch.Tensor:
    """Page relevance [B, Hkv, P] float32; see reference.score_pages."""
    scores: torch.Tensor = _backend(q).score_pages(q, summary, kind=kind)
    return scores


def select_pages_summed(q: torch.Tensor, summary: torch.Tensor, k: int) -> torch.Tensor:
    """Pages [B, 1, k] every KV head shares; see reference.select_pages_summed. A CPU decode
    step's selection is one C call (`cpu_decode.py`): a dozen small torch operations cost
    more than the product itself."""
    if not _forced_reference() and cpu_decode.handles_selection(q, summary):
        return cpu_decode.select_pages_summed(q, summary, k)
    return reference.select_pages_summed(q, summary, k)


def select_pages_bounds(q: torch.Tensor, summary: torch.Tensor, k: int) -> torch.Tensor:
    """Quest's pages [B, Hkv, k]; see reference.select_pages_bounds. A CPU decode step's
    is one C call (`cpu_decode.py`), as `select_pages_summed`'s is; bfloat16 queries (a
    chunk with bfloat16 products) score with bfloat16 products (`cpu_bf16.py`)."""
    if not _forced_reference():
        if cpu_decode.handles_bounds(q, summary):
            return cpu_decode.select_pages_bounds(q, summary, k)
        if q.dtype == torch.bfloat16 and cpu_bf16.handles_bounds(q, summary):
            return reference.select_pages(cpu_bf16.bounds_scores(q, summary, k), k)
    return reference.select_pages(score_pages(q, summary, kind="bounds"), k)


def window_put(
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor],
    first: int,
    buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    at: int,
) -> bool:
    """Write a decode token's keys and values [Hkv, T, D] into a window's buffers in one C
    call (`cpu_decode.window_put`) and say True; False, with nothing written, where that
    kernel does not take them (the caller writes them with torch)."""
    if _forced_reference() or not cpu_decode.handles_window_put(keys, buffers[0]):
        return False
    cpu_decode.window_put(keys, values, tables, first, buffers, at)
    return True


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
) -> torch.Tensor | None:
    """A resident layer's whole CPU decode step (query placement, selection, page table,
    attention) in one C call (`cpu_decode.decode_layer`, same arguments); None where that
    kernel does not take the step, which the caller then takes part by part."""
    if _forced_reference() or not cpu_decode.handles_layer(q_raw, window_k, k_pool, summaries):
        return None
    return cpu_decode.decode_layer(
        q_raw, tables, local_at, memory_at, selection, summaries, k, table, window_k,
        window_v, sink_k, sink_v, k_pool, v_pool, scale=scale,
    )  # fmt: skip


def takes_bf16_products(q: torch.Tensor) -> bool:
    """Whether a step of these queries [1, Hq, T, D] runs with bfloat16 products when asked
    (`sparse_attention(bf16_products=True)`): a CPU chunk of many queries, on a CPU with
    AVX512-BF16, whose head size the kernel takes."""
    return not _forced_reference() and cpu_flash.handles(q) and cpu_bf16.handles(q)


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
    bf16_products: bool = False,
) -> torch.Tensor:
    """One layer's window + sinks + pages attention; see reference.sparse_attention.
    `bf16_products`: a CPU prefill chunk computes its products in bfloat16 with float32
    accumulation where the CPU has AVX512-BF16 (`cpu_bf16.py`); float32 elsewhere."""
    backend = _backend(q_local)
    if backend is reference and not _forced_reference():
        if cpu_flash.handles(q_local):
            return cpu_flash.sparse_attention(
                q_local, window_k, window_v, q_memory, sink_k, sink_v, k_pool, v_pool,
                page_idx, scale=scale, padded=padded, page_lengths=page_lengths,
                bf16_products=bf16_products,
            )  # fmt: skip
        if cpu_decode.handles(q_local, window_k, k_pool):
            backend = cpu_decode
    out: torch.Tensor = backend.sparse_attention(
        q_local,
        window_k,
        window_v,
        q_memory,
        sink_k,
        sink_v,
        k_pool,
        v_pool,
        page_idx,
        scale=scale,
        padded=padded,
        page_lengths=page_lengths,
    )
    return out
