"""Decode attention benchmark (issue 5): dense SDPA over the context vs paged sparse attention.

One decode step (one query token) per layer shape: Llama-3-8B (32 q heads, 8 KV, dim 128) and
SmolLM2 (9 q, 3 KV, dim 64), bf16, pages of 64 tokens. Paths:
  dense   SDPA over every token of the context;
  sparse  score_pages (Quest bounds) + select_pages + paged_attention (Triton) for a budget;
  naive   one representative key per page, topk, index_select gather, SDPA.
Reports median times (CUDA events), bytes read, and GB/s of the attention part next to a
device-to-device copy measured in the same run. CUDA only, except `--tiny` (a 4K context on
the CPU's reference kernels), which smoke-tests the script and measures nothing of interest.

    python benchmarks/kernels.py --quick --out kernels.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from memlayer.kernels import paged_attention, score_pages, select_pages

PAGE = 64
DTYPE = torch.bfloat16
SHAPES = {"llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}  # q heads, KV heads, head dim
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONTEXTS = {
    "4K": 4 * 1024,
    "32K": 32 * 1024,
    "128K": 128 * 1024,
    "512K": 512 * 1024,
    "1M": 1024 * 1024,
}
BUDGETS = {"1K": 1024, "2K": 2048, "4K": 4096}


@dataclass
class Row:
    model: str
    context: str
    budget: str
    dense_ms: float
    sparse_ms: float
    attention_ms: float
    naive_ms: float
    dense_bytes: int
    sparse_bytes: int
    dense_gbps: float
    attention_gbps: float
    copy_gbps: float


def median_ms(fn: Callable[[], object], iters: int) -> float:
    """Median milliseconds of fn over iters runs (CUDA events; a clock on CPU), after warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if DEVICE.type != "cuda":
            started = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - started))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_gbps(iters: int, size: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of a `size` buffer."""
    src = torch.randint(0, 255, (size,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), iters)
    return 2 * src.numel() / ms / 1e6


def sparse_decode(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, summary: torch.Tensor, pages: int
) -> torch.Tensor:
    """Our decode: Quest bounds scores, top pages, paged attention (out only)."""
    picked = select_pages(score_pages(q, summary, kind="bounds"), pages)
    return paged_attention(q, k_pool, v_pool, picked, scale=q.shape[-1] ** -0.5)[0]


def naive_decode(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pages: int
) -> torch.Tensor:
    """Score each page by its first key, topk, gather pages with index_select, then SDPA."""
    kv_heads, dim = k_pool.shape[1], k_pool.shape[3]
    query = q.reshape(kv_heads, -1, dim).float().sum(dim=1)
    scores = torch.einsum("gd,pgd->gp", query, k_pool[:, :, 0].float())
    top = scores.topk(pages, dim=-1).indices  # [Hkv, pages]
    flat = (top * kv_heads + torch.arange(kv_heads, device=q.device)[:, None]).reshape(-1)
    keys = k_pool.reshape(-1, PAGE, dim).index_select(0, flat)
    values = v_pool.reshape(-1, PAGE, dim).index_select(0, flat)
    keys = keys.reshape(1, kv_heads, pages * PAGE, dim)
    values = values.reshape(1, kv_heads, pages * PAGE, dim)
    return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)


def dense_decode(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, iters: int
) -> tuple[float, int]:
    """Median ms and bytes read of SDPA over the whole context laid out densely [1, Hkv, L, D]."""
    pool, kv_heads, page, dim = k_pool.shape
    keys = k_pool.permute(1, 0, 2, 3).reshape(1, kv_heads, pool * page, dim)
    values = v_pool.permute(1, 0, 2, 3).reshape(1, kv_heads, pool * page, dim)
    ms = median_ms(lambda: F.scaled_dot_product_attention(q, keys, values, enable_gqa=True), iters)
    return ms, 2 * keys.numel() * keys.element_size()


def bench_shape(model: str, context: str, budgets: list[str], iters: int, copy: float) -> list[Row]:
    """All budgets for one model shape and context length."""
    heads, kv_heads, dim = SHAPES[model]
    tokens = CONTEXTS[context]
    pool = tokens // PAGE
    q = torch.randn(1, heads, 1, dim, device=DEVICE, dtype=DTYPE)
    k_pool = torch.randn(pool, kv_heads, PAGE, dim, device=DEVICE, dtype=DTYPE)
    v_pool = torch.randn_like(k_pool)
    summary = torch.stack([k_pool.amin(dim=2), k_pool.amax(dim=2)], dim=2)
    scale = dim**-0.5
    dense_ms, dense_bytes = dense_decode(q, k_pool, v_pool, iters)
    rows = []
    for budget in budgets:
        pages = BUDGETS[budget] // PAGE
        chosen = select_pages(score_pages(q, summary, kind="bounds"), pages)
        attention_ms = median_ms(
            functools.partial(paged_attention, q, k_pool, v_pool, chosen, scale=scale), iters
        )
        kv_bytes = 2 * pages * PAGE * kv_heads * dim * k_pool.element_size()
        rows.append(
            Row(
                model=model,
                context=context,
                budget=budget,
                dense_ms=dense_ms,
                sparse_ms=median_ms(
                    functools.partial(sparse_decode, q, k_pool, v_pool, summary, pages), iters
                ),
                attention_ms=attention_ms,
                naive_ms=median_ms(
                    functools.partial(naive_decode, q, k_pool, v_pool, pages), iters
                ),
                dense_bytes=dense_bytes,
                sparse_bytes=kv_bytes + summary.numel() * summary.element_size(),
                dense_gbps=dense_bytes / dense_ms / 1e6,
                attention_gbps=kv_bytes / attention_ms / 1e6,
                copy_gbps=copy,
            )
        )
    return rows


def main() -> None:
    """Run the grid, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32K and 128K contexts, 1K and 4K")
    parser.add_argument("--tiny", action="store_true", help="4K context, 1K budget; CPU ok")
    parser.add_argument("--iters", type=int, default=0, help="timed runs per point")
    parser.add_argument("--out", default="", help="write the rows as JSON to this path")
    args = parser.parse_args()
    if args.tiny:
        contexts, budgets, iters = ["4K"], ["1K"], args.iters or 3
    elif DEVICE.type != "cuda":
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (or --tiny); nothing was measured.")
    else:
        contexts = ["32K", "128K"] if args.quick else [c for c in CONTEXTS if c != "4K"]
        budgets = ["1K", "4K"] if args.quick else list(BUDGETS)
        iters = args.iters or (20 if args.quick else 50)
    copy = copy_gbps(iters, (1 << 20) if args.tiny else (1 << 30))
    rows = [
        row
        for model in SHAPES
        for context in contexts
        for row in bench_shape(model, context, budgets, iters, copy)
    ]
    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"{device_name}, copy {copy:.0f} GB/s")
    header = f"{'model':<10}{'ctx':>6}{'budget':>7}{'dense ms':>10}{'sparse ms':>10}"
    header += f"{'attn ms':>9}{'naive ms':>10}{'dense MB':>10}{'sparse MB':>10}"
    header += f"{'dense GB/s':>11}{'attn GB/s':>10}"
    print(header)
    for r in rows:
        print(
            f"{r.model:<10}{r.context:>6}{r.budget:>7}{r.dense_ms:>10.3f}{r.sparse_ms:>10.3f}"
            f"{r.attention_ms:>9.3f}{r.naive_ms:>10.3f}{r.dense_bytes / 1e6:>10.1f}"
            f"{r.sparse_bytes / 1e6:>10.1f}{r.dense_gbps:>11.0f}{r.attention_gbps:>10.0f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": device_name, "rows": [asdict(r) for r in rows]},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
