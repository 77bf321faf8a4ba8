"""Torch reference kernels: page scoring, top-k page selection, paged and windowed attention.

Every function returns attention as (out, lse) so partial attentions over disjoint key sets
merge exactly by log-sum-exp. Math in float32 whatever the input dtype; runs on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

SummaryKind = Literal["repr", "bounds", "centroid"]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [B, Hq, T, D] over k, v [B, Hkv, N, D] (GQA), with a bool mask."""
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qf = q.float().reshape(batch, kv_heads, group * length, dim)
    logits = torch.matmul(qf, k.float().transpose(-1, -2)) * scale
    logits = logits.reshape(batch, kv_heads, group, length, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.matmul(weights.reshape(batch, kv_heads, group * length, -1), v.float())
    out = out.reshape(batch, heads, length, dim)
    return out.to(q.dtype), lse.reshape(batch, heads, length)


def causal_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_start: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention: query i (at key index q_start + i) sees keys j <= q_start + i."""
    length, keys = q.shape[2], k.shape[2]
    pos_q = torch.arange(length, device=q.device).unsqueeze(1) + q_start
    pos_k = torch.arange(keys, device=q.device).unsqueeze(0)
    return _attend(q, k, v, scale, pos_k <= pos_q)


def filled(
    page_idx: torch.Tensor, page_size: int, page_lengths: torch.Tensor | None
) -> torch.Tensor:
    """Which keys of the listed pages exist: [B, Hkv, N, S] bool.

    A slot of page_idx [B, Hkv, N] that is -1 has none; a listed page has its first
    `page_lengths[b, g, n]` keys ([B, Hkv, N], None: every page full), so a page that holds
    fewer than S tokens (one cluster's tail) is read without its unused rows.
    """
    valid = (page_idx >= 0).unsqueeze(-1)
    if page_lengths is None:
        return valid.expand(*page_idx.shape, page_size)
    rows = torch.arange(page_size, device=page_idx.device)
    return valid & (rows < page_lengths.unsqueeze(-1))


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_idx: torch.Tensor,
    *,
    scale: float,
    page_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, Hq, T, D] over the pool pages listed per KV head in page_idx [B, Hkv, N].

    k_pool, v_pool: [P, Hkv, S, D]. Index -1 marks an empty slot. page_lengths [B, Hkv, N]:
    the keys each listed page holds (its first ones; None: all S), see `filled`.
    """
    batch, kv_heads, count = page_idx.shape
    page = k_pool.shape[2]
    safe = page_idx.clamp(min=0)
    heads = torch.arange(kv_heads, device=q.device).view(1, kv_heads, 1).expand_as(safe)
    keys = k_pool[safe, heads]  # [B, Hkv, N, S, D]
    values = v_pool[safe, heads]
    keys = keys.reshape(batch, kv_heads, count * page, -1)
    values = values.reshape(batch, kv_heads, count * page, -1)
    mask = filled(page_idx, page, page_lengths).reshape(batch, kv_heads, 1, 1, count * page)
    return _attend(q, keys, values, scale, mask)


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
    """One layer's step: T queries over the local window (causal), the sink tokens and the
    pool pages in page_idx, in one softmax. Returns out [B, Hq, T, D].

    q_local, q_memory: [B, Hq, T, D], the queries placed for the window and for memory (the
    same tensor when positions are exact). window_k/v: [B, Hkv, L, D], its last T keys the
    queries' own; sink_k/v: [B, Hkv, n, D] (n may be 0); k_pool, v_pool: [P, Hkv, S, D];
    page_idx: [B, Hkv, N], -1 for none (`padded=False` promises there is none, which skips
    masking); page_lengths [B, Hkv, N]: keys held by each listed page (None: all S, see
    `filled`; given, it masks whatever `padded` says). Equal to `merge_attention` of the
    three parts, with one softmax over the concatenated logits instead of three plus a
    merge: a fraction of the operations, which is what a one-token step on a CPU costs.
    """
    batch, heads, length, dim = q_local.shape
    kv_heads, keys = window_k.shape[1], window_k.shape[2]
    rows = heads // kv_heads * length
    groups = batch * kv_heads  # 3-D bmm over (batch, KV head): no matmul broadcasting

    def grouped(q: torch.Tensor) -> torch.Tensor:  # [B·Hkv, G·T, D], scaled
        return (q.float() * scale).reshape(groups, rows, dim)

    def flat(t: torch.Tensor) -> torch.Tensor:  # [B, Hkv, n, D] -> [B·Hkv, n, D] float
        return t.float().reshape(groups, t.shape[2], dim)

    ql = grouped(q_local)
    qm = ql if q_memory is q_local else grouped(q_memory)
    logits = [torch.bmm(ql, flat(window_k).transpose(1, 2))]
    if length > 1:  # row t sees window keys up to keys - length + t
        hidden = torch.ones(length, keys, dtype=torch.bool, device=ql.device)
        hidden = hidden.triu_(keys - length + 1)
        logits[0].view(groups, -1, length, keys).masked_fill_(hidden, float("-inf"))
    values = [flat(window_v)]
    if sink_k.shape[2]:
        logits.append(torch.bmm(qm, flat(sink_k).transpose(1, 2)))
        values.append(flat(sink_v))
    if page_idx.shape[2]:
        pool, page = k_pool.shape[0], k_pool.shape[2]
        heads_of = torch.arange(kv_heads, device=ql.device).view(1, kv_heads, 1)
        rows_of = (page_idx.clamp(min=0) * kv_heads + heads_of).view(-1)  # (page, head) rows
        shape = (groups, page_idx.shape[2] * page, dim)
        page_k = k_pool.reshape(pool * kv_heads, page, dim).index_select(0, rows_of)
        page_v = v_pool.reshape(pool * kv_heads, page, dim).index_select(0, rows_of)
        paged = torch.bmm(qm, page_k.view(shape).float().transpose(1, 2))
        if page_lengths is not None:
            empty = ~filled(page_idx, page, page_lengths)
            paged.masked_fill_(empty.reshape(groups, 1, -1), float("-inf"))
        elif padded:
            empty = (page_idx < 0).reshape(groups, -1, 1).expand(-1, -1, page)
            paged.masked_fill_(empty.reshape(groups, 1, -1), float("-inf"))
        logits.append(paged)
        values.append(page_v.view(shape).float())
    weights = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
    out = torch.bmm(weights[..., :keys], values[0])
    start = keys
    for part, value in zip(logits[1:], values[1:], strict=True):
        width = part.shape[-1]
        out = torch.baddbmm(out, weights[..., start : start + width], value)
        start += width
    return out.reshape(batch, heads, length, dim).to(q_local.dtype)


def merge_attention(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax merge of attentions over disjoint key sets (out [B,H,T,D], lse [B,H,T])."""
    stacked = torch.stack([lse.float() for lse in lses])
    total = torch.logsumexp(stacked, dim=0)
    finite_total = torch.where(torch.isinf(total), 0.0, total)
    weights = torch.exp(stacked - finite_total)  # [parts, B, H, T]; 0 for empty parts
    out = sum(w.unsqueeze(-1) * o.float() for w, o in zip(weights, outs, strict=True))
    assert isinstance(out, torch.Tensor)
    return out.to(outs[0].dtype), total


def score_pages(q: torch.Tensor, summary: torch.Tensor, *, kind: SummaryKind) -> torch.Tensor:
    """Relevance of each page to the chunk's queries: [B, Hkv, P] float32.

    q: [B, Hq, T, D]; summary: [P, Hkv, R, D].
    repr: Σ over the group's heads of mean query · mean representative key (InfLLM).
    bounds: R == 2 (min, max); max over heads and tokens of Σ_d max(q·min, q·max) (Quest).
    centroid: max over centroids of the mean group query · centroid (Squeezed).
    """
    batch, heads, length, dim = q.shape
    kv_heads = summary.shape[1]
    group = heads // kv_heads
    qf = q.float().reshape(batch, kv_heads, group, length, dim)
    if kind == "repr":
        query = qf.mean(dim=3).sum(dim=2)  # [B, Hkv, D]
        # one row (InfLLM keeps the mean representative key): a view, no pass over P·R rows
        keys = summary[:, :, 0].float() if summary.shape[2] == 1 else summary.float().mean(2)
        # per KV head [B, D] x [D, P]: a bmm, cheaper than einsum's permutes for one token
        return torch.bmm(query.transpose(0, 1), keys.permute(1, 2, 0)).transpose(0, 1)
    sf = summary.float()
    if kind == "bounds":
        # Σ_d max(q_d·min_d, q_d·max_d) = [q⁻, q⁺]·[min, max]: per KV head one matmul of
        # every (batch, query head, token) row against the pages' (min, max) rows as stored
        # ([P, 2D], read transposed in place: a 2D-long product, no [.., P, D] tensor)
        rows = qf.transpose(0, 1).reshape(kv_heads, batch * group * length, dim)
        signed = torch.cat([rows.clamp(max=0), rows.clamp(min=0)], dim=-1)
        bounds = sf.reshape(sf.shape[0], kv_heads, 2 * dim)
        return torch.stack(
            [
                (signed[h] @ bounds[:, h].T).view(batch, group * length, -1).amax(dim=1)
                for h in range(kv_heads)
            ],
            dim=1,
        )
    if kind == "centroid":
        query = qf.mean(dim=(2, 3))  # [B, Hkv, D]
        return torch.einsum("bgd,pgrd->bgpr", query, sf).amax(dim=-1)
    raise ValueError(f"kind must be 'repr', 'bounds' or 'centroid', got {kind!r}")


def score_pages_summed(q: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    """`score_pages(kind="repr")` summed over the KV heads: [B, 1, P] float32, the score of
    selectors whose every head takes the same pages (InfLLM, ReKV).

    Σ over KV heads of the group's mean query · the page's mean summary row is one dot
    product of two [Hkv·D] vectors, so the summaries are read once, as stored ([P, Hkv·D]
    rows), in a single matrix–vector product.
    """
    batch, _, length, dim = q.shape
    pages, kv_heads = summary.shape[0], summary.shape[1]
    query = q.reshape(batch, kv_heads, -1, dim).sum(2, dtype=torch.float32)  # [B, Hkv, D]
    if length > 1:  # the group's heads summed of each head's mean query, as in score_pages
        query = query / length
    rows = summary if summary.shape[2] == 1 else summary.float().mean(dim=2)
    flat = rows.reshape(pages, kv_heads * dim).float()  # a view of float32 summaries
    return torch.matmul(query.reshape(batch, kv_heads * dim), flat.T).unsqueeze(1)


def select_pages_summed(q: torch.Tensor, summary: torch.Tensor, k: int) -> torch.Tensor:
    """The k pages [B, 1, k] of the highest `score_pages_summed`, ascending, padded with -1:
    the selection every KV head shares (InfLLM, ReKV)."""
    return select_pages(score_pages_summed(q, summary), k)


def select_pages_bounds(q: torch.Tensor, summary: torch.Tensor, k: int) -> torch.Tensor:
    """The k pages [B, Hkv, k] of the highest `score_pages(kind="bounds")` per KV head,
    ascending, padded with -1: Quest's selection."""
    return select_pages(score_pages(q, summary, kind="bounds"), k)


def select_pages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k page indices per (batch, KV head), ascending, padded with -1: [B, Hkv, k] int64."""
    batch, kv_heads, pages = scores.shape
    take = min(k, pages)
    if take == k:  # nothing to pad
        return torch.sort(torch.topk(scores, k, dim=-1).indices, dim=-1).values
    out = torch.full((batch, kv_heads, k), -1, dtype=torch.long, device=scores.device)
    if take:
        top = torch.topk(scores, take, dim=-1).indices
        out[..., :take] = torch.sort(top, dim=-1).values
    return out
