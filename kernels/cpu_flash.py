"""A layer's step for a chunk of many queries on the CPU, through PyTorch's fused CPU flash
attention.

For a prefill chunk the reference materialises the [rows, keys] logits of every part and a
concatenated copy for its one softmax. PyTorch's CPU flash attention streams the keys in
blocks and returns each part's log-sum-exp, so the parts merge exactly: the window's keys
before the chunk (every query sees them), the chunk's own keys (causal, a square), the sink
tokens and the pages. A one-token decode step is cheaper in the reference's one softmax, so
`dispatch` sends only chunks of at least `FLASH_FROM` queries here.

With `bf16_products` (and a CPU with AVX512-BF16, `cpu_bf16.py`), the window (causal), the
sinks and the pages go through one C call, a flash attention whose products take bfloat16,
with nothing to merge; on a CPU with AMX its products run in the tiles (2.4 ms a SmolLM2
layer's 512-token chunk on the Xeon, against 4.2 through torch's flash attention by parts).
Where the CPU has AMX tiles but the C kernel cannot use them (a compiler that does not
target them), the parts go through PyTorch's flash attention on bfloat16 copies instead
(its products run in the tiles: twice as fast as the AVX512 loop), each part's output
rounded to bfloat16 as a GPU's flash attention rounds it, and merged in float32 by one C
pass (`cpu_bf16.merge`) that reads each part where torch left it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from memlayer.kernels import cpu_bf16, native
from memlayer.kernels.reference import filled, merge_attention

FLASH_FROM = 32  # queries; below this the reference's one softmax is as fast or faster
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _flash_kernel() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """PyTorch's CPU flash attention returning (out, log-sum-exp), where this torch has one
    that takes a mask (a private op: a torch without it keeps the reference)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or "attn_mask" not in str(op.default._schema):
        return None
    return op.default


_FLASH = _flash_kernel()


def torch_tiles() -> bool:
    """Whether bfloat16 products go through torch's flash attention: a CPU with AMX tiles for
    bfloat16 that the C kernel does not use."""
    return not cpu_bf16.tiles() and "amx_bf16" in native.cpu_flags()


def handles(q: torch.Tensor) -> bool:
    """True for a CPU chunk of at least FLASH_FROM queries in a dtype the kernel takes."""
    return (
        _FLASH is not None
        and q.device.type == "cpu"
        and q.shape[2] >= FLASH_FROM
        and q.dtype in _DTYPES
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
    bf16_products: bool = False,
) -> torch.Tensor:
    """`reference.sparse_attention`, by parts merged on their log-sum-exp (same arguments;
    `bf16_products`: bfloat16 products where `cpu_bf16` runs)."""
    assert _FLASH is not None
    batch, heads, length, dim = q_local.shape
    kv_heads, keys = window_k.shape[1], window_k.shape[2]
    group = heads // kv_heads

    def grouped(q: torch.Tensor) -> torch.Tensor:  # [B, Hkv, G·T, D]: no K/V copy for GQA
        return q.reshape(batch, kv_heads, group * length, dim)

    dtype, tiles = q_local.dtype, False
    if bf16_products and cpu_bf16.handles(q_local):
        if not torch_tiles():
            return _bf16_parts(
                grouped(q_local), window_k, window_v, grouped(q_memory), sink_k, sink_v,
                k_pool, v_pool, page_idx, length, scale, padded, page_lengths,
            ).reshape(batch, heads, length, dim)  # fmt: skip
        q_local, q_memory, window_k, window_v, sink_k, sink_v = (
            t.bfloat16() for t in (q_local, q_memory, window_k, window_v, sink_k, sink_v)
        )
        tiles = True
    ql, qm = grouped(q_local), grouped(q_memory)
    parts = []  # (out, lse) per part, of the grouped queries
    if keys > length:  # the window before the chunk: seen by every query
        before = keys - length
        parts.append(_FLASH(ql, window_k[:, :, :before], window_v[:, :, :before], scale=scale))
    own_k, own_v = window_k[:, :, keys - length :], window_v[:, :, keys - length :]
    mask = _grouped_causal_mask(group, length, q_local.dtype)
    parts.append(_FLASH(ql, own_k, own_v, attn_mask=mask, scale=scale))
    if sink_k.shape[2]:
        parts.append(_FLASH(qm, sink_k, sink_v, scale=scale))
    if page_idx.shape[2]:
        parts.append(_pages(qm, k_pool, v_pool, page_idx, scale, padded, page_lengths))
    if tiles:  # bfloat16 parts: merged in one C pass, straight from their layouts
        out, _ = cpu_bf16.merge(parts, kv_heads=kv_heads, tokens=length)
    else:
        outs = [grouped(part).to(dtype) for part, _ in parts]
        lses = [lse.reshape(batch, kv_heads, group * length) for _, lse in parts]
        out, _ = merge_attention(outs, lses)
    return out.reshape(batch, heads, length, dim)


@functools.lru_cache(maxsize=8)
def _grouped_causal_mask(group: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, G·T, T] additive mask of the chunk's own keys for grouped queries (row r is
    token r % T): 0 where key n <= r % T, else -inf. One per chunk shape, shared by every
    layer: grouped, the causal part needs no copy of its keys per query head (the flash
    kernel's own causal flag would read row r as token r)."""
    token = torch.arange(length).repeat(group)
    mask = torch.zeros(group * length, length, dtype=dtype)
    mask.masked_fill_(torch.arange(length)[None, :] > token[:, None], float("-inf"))
    return mask[None, None]


def _bf16_parts(
    ql: torch.Tensor,
    window_k: torch.Tensor,
    window_v: torch.Tensor,
    qm: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_idx: torch.Tensor,
    length: int,
    scale: float,
    padded: bool,
    page_lengths: torch.Tensor | None,
) -> torch.Tensor:
    """The grouped step's output [1, Hkv, G·T, D] for T = `length` tokens, with bfloat16
    products: the window (causal), the sinks and the pages in one softmax, one C call (a
    selection that pads, or pages held in part, keep the float32 flash attention for their
    part, which needs a mask, merged after)."""
    before = window_k.shape[2] - length
    parts: list[cpu_bf16.Part] = [(ql, window_k, window_v, before)]
    if sink_k.shape[2]:
        parts.append((qm, sink_k, sink_v, None))
    masked = None
    if page_idx.shape[2]:
        if page_lengths is None and not padded:
            page_k, page_v = _gathered(k_pool, v_pool, page_idx)
            parts.append((qm, page_k, page_v, None))
        else:
            masked = _pages(qm, k_pool, v_pool, page_idx, scale, padded, page_lengths)
    out, lse = cpu_bf16.attend_parts(parts, tokens=length, scale=scale)
    if masked is not None:
        out, _ = merge_attention([out, masked[0]], [lse, masked[1]])
    return out


def _gathered(
    k_pool: torch.Tensor, v_pool: torch.Tensor, page_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, Hkv, count·page, D] of the listed pages, gathered per (page, KV
    head) row in the pool's dtype."""
    batch, kv_heads, count = page_idx.shape
    pool, page, dim = k_pool.shape[0], k_pool.shape[2], k_pool.shape[3]
    heads_of = torch.arange(kv_heads, device=page_idx.device).view(1, kv_heads, 1)
    rows = (page_idx.clamp(min=0) * kv_heads + heads_of).view(-1)
    shape = (batch, kv_heads, count * page, dim)
    page_k = k_pool.reshape(pool * kv_heads, page, dim).index_select(0, rows).view(shape)
    page_v = v_pool.reshape(pool * kv_heads, page, dim).index_select(0, rows).view(shape)
    return page_k, page_v


def _pages(
    qm: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_idx: torch.Tensor,
    scale: float,
    padded: bool,
    page_lengths: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of grouped queries over the listed pages, gathered per (page, KV head) row;
    a head with no key to read gets a log-sum-exp of -inf (the flash kernel reports 0)."""
    assert _FLASH is not None
    batch, kv_heads, count = page_idx.shape
    page = k_pool.shape[2]
    page_k, page_v = _gathered(k_pool, v_pool, page_idx)
    page_k, page_v = page_k.to(qm.dtype), page_v.to(qm.dtype)  # pages kept narrower
    if page_lengths is None and not padded:
        return _FLASH(qm, page_k, page_v, scale=scale)
    present = filled(page_idx, page, page_lengths).reshape(batch, kv_heads, 1, count * page)
    mask = torch.zeros(present.shape, dtype=qm.dtype, device=qm.device)
    mask.masked_fill_(~present, float("-inf"))
    out, lse = _FLASH(qm, page_k, page_v, attn_mask=mask, scale=scale)
    return out, lse.masked_fill(~present.any(dim=-1), float("-inf"))
