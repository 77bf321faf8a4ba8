"""Triton kernels: paged sparse attention (split-K, GQA) and page scoring, same API as reference.

score_pages scores pages per (batch, KV head, block of pages): the Quest bound with two
matmuls over the query rows, and a float32 dot with the reduced query for repr and centroid.
paged_attention runs one program per (batch, KV head, block of query rows, slice of the
selected pages): it reads each selected page once for all query heads of its group, keeps an
online softmax in float32 and writes a partial (out, lse); a second kernel merges the slices.
Imported only for CUDA tensors (or under TRITON_INTERPRET=1 in tests): it imports triton.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from memlayer.kernels.reference import SummaryKind, merge_attention

_LOG2E = 1.4426950408889634  # kernels use exp2 and log2
_MIN_SPLIT_TOKENS = 256  # a split-K slice reads at least this many keys
_BLOCK_N = 64  # keys per inner step, gathered across pages when pages are smaller
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _paged_partial_kernel(
    q_ptr: tl.tensor,
    k_ptr: tl.tensor,
    v_ptr: tl.tensor,
    idx_ptr: tl.tensor,
    len_ptr: tl.tensor,
    out_ptr: tl.tensor,
    lse_ptr: tl.tensor,
    sq_b: int,
    sq_h: int,
    sq_t: int,
    sq_d: int,
    sk_p: int,
    sk_h: int,
    sk_s: int,
    sk_d: int,
    sv_p: int,
    sv_h: int,
    sv_s: int,
    sv_d: int,
    si_b: int,
    si_h: int,
    si_n: int,
    sl_b: int,
    sl_h: int,
    sl_n: int,
    kv_heads: int,
    length: int,
    dim: int,
    count: int,
    pages_per_split: int,
    rows_total: int,
    scale_log2: float,
    causal_start: int,
    key_limit: int,
    GROUP: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_TYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
) -> None:
    """Online-softmax attention of one row block of a KV head's queries over one page slice.

    Key j of the listed pages' concatenation is seen by query t when j < key_limit and
    j <= causal_start + t (a local window read in place as pages; huge for plain pages),
    and, with HAS_LENGTHS, when its row in its page is below that page's length."""
    bh = tl.program_id(0)
    split = tl.program_id(2)
    b = bh // kv_heads
    g = bh % kv_heads
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # row = head_in_group * T + t
    row_ok = rows < GROUP * length
    head = g * GROUP + rows // length
    t = rows % length
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    q_off = b * sq_b + head[:, None] * sq_h + t[:, None] * sq_t + d[None, :] * sq_d
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(DOT_TYPE)
    first = split * pages_per_split
    last = tl.minimum(first + pages_per_split, count)
    # keys past what the block's latest query sees are never read (a causal window's upper
    # triangle: about half of a prefill chunk's window)
    t_last = tl.max(tl.where(row_ok, t, 0), 0)
    end = tl.minimum(last * PAGE, tl.minimum(key_limit, causal_start + t_last + 1))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for start in range(first * PAGE, end, BLOCK_N):
        tok = start + n
        slot = tok // PAGE
        page = tl.load(idx_ptr + b * si_b + g * si_h + slot * si_n, mask=slot < last, other=-1)
        valid = (page >= 0) & (tok < key_limit)
        pos = tok % PAGE
        if HAS_LENGTHS:
            held = tl.load(len_ptr + b * sl_b + g * sl_h + slot * sl_n, mask=slot < last, other=0)
            valid = valid & (pos < held)
        kv_mask = valid[:, None] & d_ok[None, :]
        k_off = page[:, None] * sk_p + g * sk_h + pos[:, None] * sk_s + d[None, :] * sk_d
        k = tl.load(k_ptr + k_off, mask=kv_mask, other=0.0)
        logits = tl.dot(q, tl.trans(k.to(DOT_TYPE)), input_precision=PRECISION) * scale_log2
        seen_by = valid[None, :] & (tok[None, :] <= causal_start + t[:, None])
        logits = tl.where(seen_by, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(logits - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = page[:, None] * sv_p + g * sv_h + pos[:, None] * sv_s + d[None, :] * sv_d
        v = tl.load(v_ptr + v_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(DOT_TYPE), v.to(DOT_TYPE), input_precision=PRECISION
        )
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, m_i)
    flat = (b * kv_heads * GROUP + head) * length + t + split * rows_total
    out_mask = row_ok[:, None] & d_ok[None, :]
    out_off = flat[:, None] * dim + d[None, :]
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(lse_ptr + flat, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_ptr: tl.tensor,
    part_lse_ptr: tl.tensor,
    out_ptr: tl.tensor,
    lse_ptr: tl.tensor,
    splits: int,
    rows_total: int,
    dim: int,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> None:
    """Log-sum-exp merge of one query row's split-K partials into the final (out, lse)."""
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < splits
    d_ok = d < dim
    lse = tl.load(part_lse_ptr + s * rows_total + row, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(lse - top_safe)
    total = tl.sum(weight, 0)
    safe_total = tl.where(total > 0.0, total, 1.0)
    part_off = (s[:, None] * rows_total + row) * dim + d[None, :]
    part = tl.load(part_ptr + part_off, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(part * weight[:, None], 0) / safe_total
    tl.store(out_ptr + row * dim + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + row, tl.where(total > 0.0, top_safe + tl.log(safe_total), top))


def _dot_config(dtype: torch.dtype) -> dict[str, object]:
    """Operand type and precision of tl.dot for operands of `dtype`: exact float32 for
    float32, else the 16-bit type. Attention passes the wider of the queries' and the pool's
    dtype, so bfloat16 pages under a float32 model dot in float32.

    Under TRITON_INTERPRET=1 operands go to float32: the interpreter's dot (numpy) has no
    bfloat16 and returns garbage for it.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or dtype == torch.float32:
        return {"DOT_TYPE": tl.float32, "PRECISION": "ieee"}
    return {"DOT_TYPE": _TL_DTYPES[dtype], "PRECISION": "tf32"}


def _num_splits(programs: int, count: int, device: torch.device) -> int:
    """Page slices per (batch, KV head, row block) so the grid covers the GPU about twice."""
    units = 4  # the interpreter on CPU: still split, so tests cover the merge
    if device.type == "cuda":
        units = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(count, math.ceil(2 * units / programs)))


_NO_LIMIT = 2**30  # causal_start / key_limit of plain pages: every key seen


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_idx: torch.Tensor,
    *,
    scale: float,
    splits: int | None = None,
    page_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of reference.paged_attention; `splits` forces the split-K count (tests)."""
    return _attention(
        q,
        k_pool,
        v_pool,
        page_idx,
        k_pool.stride(),
        v_pool.stride(),
        page=k_pool.shape[2],
        scale=scale,
        splits=splits,
        page_lengths=page_lengths,
    )


def causal_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_start: int,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of reference.causal_window_attention (batch 1): the keys [1, Hkv, L, D]
    are read in place as pages of _BLOCK_N tokens by the paged kernel, causally masked."""
    if q.shape[0] != 1:
        raise ValueError(f"the Triton window attention takes batch 1, got {q.shape[0]}")
    count = triton.cdiv(k.shape[2], _BLOCK_N)
    pages = torch.arange(count, device=q.device).view(1, 1, count).expand(1, k.shape[1], count)

    def as_pages(t: torch.Tensor) -> tuple[int, int, int, int]:  # [P, Hkv, S, D] strides
        return (_BLOCK_N * t.stride(2), t.stride(1), t.stride(2), t.stride(3))

    return _attention(
        q,
        k,
        v,
        pages,
        as_pages(k),
        as_pages(v),
        page=_BLOCK_N,
        scale=scale,
        splits=splits,
        causal_start=q_start,
        key_limit=k.shape[2],
    )


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
    """Triton twin of reference.sparse_attention (batch 1): window, sinks and pages each
    through the paged kernel, merged by log-sum-exp (`padded` needs no special case here)."""
    length = q_local.shape[2]
    parts = [
        causal_window_attention(
            q_local, window_k, window_v, scale=scale, q_start=window_k.shape[2] - length
        )
    ]
    if sink_k.shape[2]:
        parts.append(
            causal_window_attention(q_memory, sink_k, sink_v, scale=scale, q_start=sink_k.shape[2])
        )
    if page_idx.shape[2]:
        parts.append(
            paged_attention(
                q_memory, k_pool, v_pool, page_idx, scale=scale, page_lengths=page_lengths
            )
        )
    out, _ = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    return out


def _attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_idx: torch.Tensor,
    k_strides: tuple[int, ...],
    v_strides: tuple[int, ...],
    *,
    page: int,
    scale: float,
    splits: int | None,
    causal_start: int = _NO_LIMIT,
    key_limit: int = _NO_LIMIT,
    page_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the paged kernel (and the split merge) over pages of `page` tokens whose
    [P, Hkv, S, D] strides are given, so a window can be read in place; `page_lengths`
    [B, Hkv, N] (None: every page full) masks the unused tail of partly filled pages."""
    batch, heads, length, dim = q.shape
    kv_heads = page_idx.shape[1]
    count = page_idx.shape[2]
    group = heads // kv_heads
    rows = group * length
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    m_blocks = triton.cdiv(rows, block_m)
    if splits is None:
        min_pages = triton.cdiv(_MIN_SPLIT_TOKENS, page)
        wanted = _num_splits(batch * kv_heads * m_blocks, count, q.device)
        per_split = max(min_pages, triton.cdiv(count, wanted))
    else:
        per_split = max(1, triton.cdiv(count, splits))
    n_splits = max(1, triton.cdiv(count, per_split))
    rows_total = batch * heads * length
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    if n_splits == 1:
        part, part_lse = out, lse
    else:
        part = torch.empty((n_splits, *q.shape), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((n_splits, *lse.shape), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(dim))
    lengths = page_idx if page_lengths is None else page_lengths  # unread when None
    _paged_partial_kernel[(batch * kv_heads, m_blocks, n_splits)](
        q,
        k_pool,
        v_pool,
        page_idx,
        lengths,
        part,
        part_lse,
        *q.stride(),
        *k_strides,
        *v_strides,
        *page_idx.stride(),
        *lengths.stride(),
        kv_heads,
        length,
        dim,
        count,
        per_split,
        rows_total,
        scale * _LOG2E,
        causal_start,
        key_limit,
        GROUP=group,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=block_d,
        HAS_LENGTHS=page_lengths is not None,
        **_dot_config(torch.promote_types(q.dtype, k_pool.dtype)),
    )
    if n_splits > 1:
        _merge_splits_kernel[(rows_total,)](
            part,
            part_lse,
            out,
            lse,
            n_splits,
            rows_total,
            dim,
            BLOCK_S=triton.next_power_of_2(n_splits),
            BLOCK_D=block_d,
        )
    return out, lse


@triton.jit
def _bounds_kernel(
    q_ptr: tl.tensor,
    s_ptr: tl.tensor,
    out_ptr: tl.tensor,
    sq_b: int,
    sq_h: int,
    sq_t: int,
    sq_d: int,
    ss_p: int,
    ss_h: int,
    ss_r: int,
    ss_d: int,
    kv_heads: int,
    length: int,
    dim: int,
    pages: int,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_TYPE: tl.constexpr,
    PRECISION: tl.constexpr,
) -> None:
    """Quest bound max over a KV head's query rows of q⁺·max + q⁻·min for one page block."""
    bh = tl.program_id(0)
    b = bh // kv_heads
    g = bh % kv_heads
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < pages
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    s_off = p[None, :] * ss_p + g * ss_h + d[:, None] * ss_d  # [BLOCK_D, BLOCK_P]
    s_mask = d_ok[:, None] & p_ok[None, :]
    low = tl.load(s_ptr + s_off, mask=s_mask, other=0.0).to(DOT_TYPE)
    high = tl.load(s_ptr + s_off + ss_r, mask=s_mask, other=0.0).to(DOT_TYPE)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for start in range(0, GROUP * length, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < GROUP * length
        head = g * GROUP + rows // length
        t = rows % length
        q_off = b * sq_b + head[:, None] * sq_h + t[:, None] * sq_t + d[None, :] * sq_d
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q = q.to(tl.float32)
        pos = tl.where(q > 0.0, q, 0.0).to(DOT_TYPE)
        neg = tl.where(q < 0.0, q, 0.0).to(DOT_TYPE)
        upper = tl.dot(pos, high, input_precision=PRECISION)
        upper += tl.dot(neg, low, input_precision=PRECISION)
        best = tl.maximum(best, tl.max(tl.where(row_ok[:, None], upper, float("-inf")), 0))
    tl.store(out_ptr + bh * pages + p, best, mask=p_ok)


@triton.jit
def _summary_dot_kernel(
    query_ptr: tl.tensor,
    s_ptr: tl.tensor,
    out_ptr: tl.tensor,
    ss_p: int,
    ss_h: int,
    ss_r: int,
    ss_d: int,
    kv_heads: int,
    reps: int,
    dim: int,
    pages: int,
    MEAN: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> None:
    """query · summary[p, g, r] for one page block, reduced over r by mean (repr) or max."""
    bh = tl.program_id(0)
    g = bh % kv_heads
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < pages
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    query = tl.load(query_ptr + bh * dim + d, mask=d_ok, other=0.0)
    mask = p_ok[:, None] & d_ok[None, :]
    s_off = p[:, None] * ss_p + g * ss_h + d[None, :] * ss_d
    acc = tl.full([BLOCK_P], 0.0 if MEAN else float("-inf"), tl.float32)
    for r in range(reps):
        summary = tl.load(s_ptr + s_off + r * ss_r, mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(summary * query[None, :], 1)
        if MEAN:
            acc += dot
        else:
            acc = tl.maximum(acc, dot)
    if MEAN:
        acc = acc / reps
    tl.store(out_ptr + bh * pages + p, acc, mask=p_ok)


def score_pages(q: torch.Tensor, summary: torch.Tensor, *, kind: SummaryKind) -> torch.Tensor:
    """Triton twin of reference.score_pages: [B, Hkv, P] float32 page scores."""
    batch, heads, length, dim = q.shape
    pages, kv_heads, reps = summary.shape[:3]
    group = heads // kv_heads
    out = torch.empty((batch, kv_heads, pages), dtype=torch.float32, device=q.device)
    block_p = 64
    block_d = max(16, triton.next_power_of_2(dim))
    grid = (batch * kv_heads, triton.cdiv(pages, block_p))
    if kind == "bounds":
        _bounds_kernel[grid](
            q,
            summary,
            out,
            *q.stride(),
            *summary.stride(),
            kv_heads,
            length,
            dim,
            pages,
            GROUP=group,
            BLOCK_M=min(64, max(16, triton.next_power_of_2(group * length))),
            BLOCK_P=block_p,
            BLOCK_D=block_d,
            **_dot_config(summary.dtype),
        )
        return out
    qf = q.float().reshape(batch, kv_heads, group, length, dim)
    if kind == "repr":
        query = qf.mean(dim=3).sum(dim=2)
    elif kind == "centroid":
        query = qf.mean(dim=(2, 3))
    else:
        raise ValueError(f"kind must be 'repr', 'bounds' or 'centroid', got {kind!r}")
    _summary_dot_kernel[grid](
        query.contiguous(),
        summary,
        out,
        *summary.stride(),
        kv_heads,
        reps,
        dim,
        pages,
        MEAN=kind == "repr",
        BLOCK_P=block_p,
        BLOCK_D=block_d,
    )
    return out
