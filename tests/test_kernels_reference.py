"""Reference kernels against plain dense softmax attention: exact merges, paged gathers, scoring.

Small cases compare against float32 dense attention at 1e-5. The paged cases (64 slots, empty
slots, decode, GQA, logits in the hundreds) compare against float64 dense attention over the
same inputs, so the bound is what the reference's own float32 costs: lse to 1e-5·max(1, |lse|)
(float32 logits of size |z| round by a few eps32·|z|); out to half an ulp of the output dtype
plus what a logit error δz ≤ 8·eps32·(1 + max|z|) moves a softmax mean, δz·(p·|v| + |out|).
Every random case draws its tensors from the seed in its test id.
"""

from __future__ import annotations

import itertools
from typing import Literal

import pytest
import torch

from memlayer.kernels import (
    causal_window_attention,
    merge_attention,
    paged_attention,
    score_pages,
    score_pages_summed,
    select_pages,
    sparse_attention,
)

SEED = 1234
EPS32 = torch.finfo(torch.float32).eps
Logits = Literal["normal", "large", "negative"]


def _dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with GQA by repeating KV heads, in float32: (out, lse)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    logits = (q.float() @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v, torch.logsumexp(logits, dim=-1)


@pytest.fixture(params=[SEED], ids=lambda seed: f"seed{seed}")
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded with the seed named in the test id."""
    return torch.Generator().manual_seed(request.param)


def test_causal_window_attention_matches_dense(gen: torch.Generator) -> None:
    """Causal attention over GQA heads, queries starting at key 7, equals masked dense."""
    q = torch.randn(2, 6, 5, 16, generator=gen)
    k = torch.randn(2, 2, 12, 16, generator=gen)
    v = torch.randn(2, 2, 12, 16, generator=gen)
    out, lse = causal_window_attention(q, k, v, scale=0.25, q_start=7)
    pos_q = torch.arange(5).unsqueeze(1) + 7
    pos_k = torch.arange(12).unsqueeze(0)
    mask = pos_k <= pos_q
    ref, ref_lse = _dense(q, k, v, 0.25, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_paged_plus_local_merge_equals_dense_over_the_union(gen: torch.Generator) -> None:
    """Pages plus a causal local window, merged by log-sum-exp, equal dense over their union."""
    pool_k = torch.randn(7, 2, 4, 8, generator=gen)
    pool_v = torch.randn(7, 2, 4, 8, generator=gen)
    local_k = torch.randn(1, 2, 6, 8, generator=gen)
    local_v = torch.randn(1, 2, 6, 8, generator=gen)
    q = torch.randn(1, 4, 3, 8, generator=gen)
    idx = torch.tensor([[[5, 1, -1], [0, 2, 6]]])  # per KV head, with an empty slot
    paged = paged_attention(q, pool_k, pool_v, idx, scale=0.3)
    local = causal_window_attention(q, local_k, local_v, scale=0.3, q_start=3)
    out, lse = merge_attention([paged[0], local[0]], [paged[1], local[1]])
    for head in range(4):
        g = head // 2
        pages = [p for p in idx[0, g].tolist() if p >= 0]
        keys = torch.cat([pool_k[pages, g].reshape(-1, 8), local_k[0, g]])
        values = torch.cat([pool_v[pages, g].reshape(-1, 8), local_v[0, g]])
        n_paged = len(pages) * 4
        mask = torch.ones(3, keys.shape[0], dtype=torch.bool)
        for i in range(3):
            mask[i, n_paged + 3 + i + 1 :] = False
        ref, ref_lse = _dense(
            q[:, head : head + 1], keys[None, None], values[None, None], 0.3, mask
        )
        torch.testing.assert_close(out[0, head], ref[0, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[0, head], ref_lse[0, 0], rtol=1e-5, atol=1e-5)


def test_empty_parts_contribute_nothing(gen: torch.Generator) -> None:
    """A part with every slot empty is (0, -inf) and leaves a merge unchanged."""
    q = torch.randn(1, 2, 2, 8, generator=gen)
    pool = torch.randn(3, 1, 4, 8, generator=gen)
    empty = paged_attention(q, pool, pool, torch.full((1, 1, 2), -1), scale=1.0)
    assert torch.isinf(empty[1]).all() and (empty[0] == 0).all()
    local = causal_window_attention(q, pool[:1], pool[:1], scale=1.0, q_start=3)
    merged = merge_attention([empty[0], local[0]], [empty[1], local[1]])
    torch.testing.assert_close(merged[0], local[0])
    torch.testing.assert_close(merged[1], local[1])


def test_bf16_inputs_keep_their_dtype(gen: torch.Generator) -> None:
    """out keeps the input dtype; lse is float32."""
    q = torch.randn(1, 2, 1, 8, generator=gen).bfloat16()
    pool = torch.randn(3, 1, 4, 8, generator=gen).bfloat16()
    out, lse = paged_attention(q, pool, pool, torch.tensor([[[0, 2]]]), scale=0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def _paged_inputs(
    seed: int, dtype: torch.dtype, group: int, length: int, logits: Logits
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k_pool, v_pool (dtype) and a page_idx of 64 slots per KV head, ~30% of them empty.

    "large" scales q and k 8× (logits ~ N(0, 64²), past float32 exp's 88.7); "negative"
    adds -300 to every logit (exp is 0 in float32). KV head 1 of batch 1 selects nothing.
    """
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads, dim, page, slots = 2, 2, 32, 8, 64
    q = torch.randn(batch, kv_heads * group, length, dim, generator=gen)
    k_pool = torch.randn(slots + 6, kv_heads, page, dim, generator=gen)
    v_pool = torch.randn(slots + 6, kv_heads, page, dim, generator=gen)
    if logits == "large":
        q, k_pool = q * 8, k_pool * 8
    elif logits == "negative":
        q[..., 0] = 16.0
        k_pool[..., 0] = -300 / 16 * dim**0.5
    perms = [torch.randperm(slots + 6, generator=gen)[:slots] for _ in range(batch * kv_heads)]
    idx = torch.stack(perms).reshape(batch, kv_heads, slots)
    idx[torch.rand(idx.shape, generator=gen) < 0.3] = -1
    idx[1, 1] = -1
    return q.to(dtype), k_pool.to(dtype), v_pool.to(dtype), idx


def _float64_paged(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, idx: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Dense float64 attention over each KV head's valid pages: out, lse, p·|v|, max|logit|."""
    batch, heads, length, dim = q.shape
    kv_heads = idx.shape[1]
    group = heads // kv_heads
    out = torch.zeros(batch, heads, length, dim, dtype=torch.float64)
    mean_abs_v = torch.zeros_like(out)
    lse = torch.full((batch, heads, length), float("-inf"), dtype=torch.float64)
    zmax = 0.0
    for b, g in itertools.product(range(batch), range(kv_heads)):
        pages = [p for p in idx[b, g].tolist() if p >= 0]
        if not pages:
            continue
        keys = k_pool[pages, g].reshape(-1, dim).double()
        values = v_pool[pages, g].reshape(-1, dim).double()
        rows = slice(g * group, (g + 1) * group)
        logits = q[b, rows].double() @ keys.T * scale  # [group, T, keys]
        weights = torch.softmax(logits, dim=-1)
        out[b, rows] = weights @ values
        mean_abs_v[b, rows] = weights @ values.abs()
        lse[b, rows] = torch.logsumexp(logits, dim=-1)
        zmax = max(zmax, float(logits.abs().max()))
    return out, lse, mean_abs_v, zmax


PAGED_CASES = list(
    itertools.product(
        (torch.float32, torch.float16, torch.bfloat16),
        (1, 4),
        (1, 5),
        ("normal", "large", "negative"),
    )
)


@pytest.mark.parametrize(
    ("dtype", "group", "length", "logits"),
    PAGED_CASES,
    ids=[f"{str(d).removeprefix('torch.')}-g{g}-t{t}-{z}-seed{SEED}" for d, g, t, z in PAGED_CASES],
)
def test_paged_attention_matches_float64_over_64_slots(
    dtype: torch.dtype, group: int, length: int, logits: Logits
) -> None:
    """Decode and prefill, GQA, empty slots and logits in the hundreds, against float64."""
    q, k_pool, v_pool, idx = _paged_inputs(SEED, dtype, group, length, logits)
    scale = q.shape[-1] ** -0.5
    out, lse = paged_attention(q, k_pool, v_pool, idx, scale=scale)
    ref, ref_lse, mean_abs_v, zmax = _float64_paged(q, k_pool, v_pool, idx, scale)
    assert zmax > 100 if logits != "normal" else zmax < 10
    assert out.dtype == dtype and out.isfinite().all()
    assert torch.equal(lse.isneginf(), ref_lse.isneginf())
    finite = ref_lse.isfinite()
    lse_error = (lse[finite].double() - ref_lse[finite]).abs()
    assert (lse_error <= 1e-5 * ref_lse[finite].abs().clamp(min=1)).all(), lse_error.max()
    logit_error = 8 * EPS32 * (1 + zmax)
    eps = torch.finfo(dtype).eps
    bound = eps / 2 * ref.abs() + logit_error * (mean_abs_v + ref.abs())
    error = (out.double() - ref).abs()
    assert (error <= bound).all(), float((error / bound.clamp(min=1e-300)).max())


@pytest.mark.parametrize("logits", ["normal", "large", "negative"])
def test_merging_slices_of_the_pages_equals_attending_to_all(logits: Logits) -> None:
    """Split-K in the reference: the LSE merge of three page slices is the attention over all."""
    q, k_pool, v_pool, idx = _paged_inputs(SEED, torch.float32, 3, 2, logits)
    whole, whole_lse = paged_attention(q, k_pool, v_pool, idx, scale=0.2)
    parts = [paged_attention(q, k_pool, v_pool, s, scale=0.2) for s in idx.split(22, dim=-1)]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    assert torch.equal(lse.isneginf(), whole_lse.isneginf()), f"seed {SEED}"
    finite = whole_lse.isfinite()
    torch.testing.assert_close(lse[finite], whole_lse[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)


def test_scoring_and_selection_pick_the_aligned_page(gen: torch.Generator) -> None:
    """Every summary kind ranks the page built from the mean query first; top-k keeps it."""
    q = torch.randn(1, 4, 3, 8, generator=gen)
    keys = torch.randn(10, 2, 6, 8, generator=gen) * 0.1
    target = q[0].reshape(2, 2, 3, 8).mean(dim=(1, 2))  # the mean query per KV head
    keys[7] = target.unsqueeze(1) * 5
    summaries = {
        "repr": keys,
        "bounds": torch.stack([keys.amin(dim=2), keys.amax(dim=2)], dim=2),
        "centroid": keys[:, :, :2],
    }
    for kind, summary in summaries.items():
        scores = score_pages(q, summary, kind=kind)
        assert scores.shape == (1, 2, 10)
        assert (scores.argmax(dim=-1) == 7).all(), kind
    chosen = select_pages(score_pages(q, keys, kind="repr"), 3)
    assert chosen.shape == (1, 2, 3) and (chosen == 7).any(dim=-1).all()
    assert (chosen.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("rows", [1, 4])
def test_summed_score_is_the_per_head_score_summed_over_kv_heads(
    gen: torch.Generator, rows: int
) -> None:
    """InfLLM's and ReKV's one matrix-vector product equals score_pages' heads summed, for a
    batch of two, several tokens and one or several summary rows."""
    q = torch.randn(2, 6, 3, 16, generator=gen)
    summary = torch.randn(9, 3, rows, 16, generator=gen)
    summed = score_pages_summed(q, summary)
    per_head = score_pages(q, summary, kind="repr").sum(dim=1, keepdim=True)
    assert summed.shape == (2, 1, 9)
    torch.testing.assert_close(summed, per_head, rtol=1e-5, atol=1e-5)


def test_quest_bound_is_an_upper_bound(gen: torch.Generator) -> None:
    """The Quest score is at least the best real q·k of the page."""
    q = torch.randn(1, 2, 1, 8, generator=gen)
    keys = torch.randn(5, 1, 16, 8, generator=gen)
    bounds = torch.stack([keys.amin(dim=2), keys.amax(dim=2)], dim=2)
    upper = score_pages(q, bounds, kind="bounds")[0, 0]
    actual = torch.einsum("htd,psd->hps", q[0, :, :, :], keys[:, 0]).amax(dim=(0, 2))
    assert (upper >= actual - 1e-5).all()


def test_quest_score_is_its_definition_for_every_batch_head_and_token(
    gen: torch.Generator,
) -> None:
    """Quest's score of page p for KV head g: the max over the group's query heads and the
    tokens of Σ_d max(q_d·min_d, q_d·max_d), against a float64 loop over the definition."""
    q = torch.randn(2, 6, 3, 8, generator=gen)  # B=2, 3 KV heads of 2 query heads, T=3
    keys = torch.randn(5, 3, 4, 8, generator=gen)
    bounds = torch.stack([keys.amin(dim=2), keys.amax(dim=2)], dim=2)
    expected = torch.empty(2, 3, 5, dtype=torch.float64)
    for b, g, p in itertools.product(range(2), range(3), range(5)):
        rows = q[b, 2 * g : 2 * g + 2].double().reshape(-1, 8)
        low, high = bounds[p, g, 0].double(), bounds[p, g, 1].double()
        expected[b, g, p] = torch.maximum(rows * low, rows * high).sum(dim=-1).max()
    got = score_pages(q, bounds, kind="bounds")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_selection_pads_when_pages_are_few() -> None:
    """Fewer pages than k: all of them, ascending, then -1."""
    chosen = select_pages(torch.tensor([[[0.3, 0.9]]]), 4)
    assert chosen.tolist() == [[[0, 1, -1, -1]]]


def _layer_step_inputs(
    length: int, sinks: int, pages: list[list[int]], *, same_queries: bool
) -> dict[str, torch.Tensor]:
    """One layer's step: 4 query heads over 2 KV heads, a window of 11 keys, sink tokens and
    a pool of 6 pages of 3 tokens; `pages` per KV head (-1: none)."""
    gen = torch.Generator().manual_seed(SEED)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    q_local = rand(1, 4, length, 8)
    return {
        "q_local": q_local,
        "window_k": rand(1, 2, 11, 8),
        "window_v": rand(1, 2, 11, 8),
        "q_memory": q_local if same_queries else rand(1, 4, length, 8),
        "sink_k": rand(1, 2, sinks, 8),
        "sink_v": rand(1, 2, sinks, 8),
        "k_pool": rand(6, 2, 3, 8),
        "v_pool": rand(6, 2, 3, 8),
        "page_idx": torch.tensor([pages]),
    }


@pytest.mark.parametrize("length", [1, 4])
@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("same_queries", [False, True])
@pytest.mark.parametrize("pages", [[[0, 5], [3, 1]], [[2, -1], [-1, -1]], [[], []]])
def test_a_layer_step_in_one_softmax_equals_the_merge_of_its_parts(
    length: int, sinks: int, same_queries: bool, pages: list[list[int]]
) -> None:
    """sparse_attention (window causal + sinks + pages, one softmax) against the three
    parts attended apart and merged by log-sum-exp; `padded=False` the same when no -1."""
    x = _layer_step_inputs(length, sinks, pages, same_queries=same_queries)
    out = sparse_attention(**x, scale=0.3)
    parts = [
        causal_window_attention(
            x["q_local"], x["window_k"], x["window_v"], scale=0.3, q_start=11 - length
        )
    ]
    if sinks:
        parts.append(
            causal_window_attention(
                x["q_memory"], x["sink_k"], x["sink_v"], scale=0.3, q_start=sinks
            )
        )
    if x["page_idx"].shape[-1]:
        parts.append(
            paged_attention(x["q_memory"], x["k_pool"], x["v_pool"], x["page_idx"], scale=0.3)
        )
    expected, _ = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    if not (x["page_idx"] < 0).any():
        assert torch.equal(sparse_attention(**x, scale=0.3, padded=False), out)


def test_partly_filled_pages_equal_dense_over_the_keys_they_hold(gen: torch.Generator) -> None:
    """page_lengths: a listed page holds its first n keys; the rest of it is never read.

    The pool's unused rows are filled with huge keys, so reading any of them moves the
    output; paged_attention and a layer step (sparse_attention, `padded=False` too) equal
    dense attention over exactly the held keys."""
    pool_k = torch.randn(5, 2, 4, 8, generator=gen)
    pool_v = torch.randn(5, 2, 4, 8, generator=gen)
    idx = torch.tensor([[[3, 0, -1], [1, 4, 2]]])
    lengths = torch.tensor([[[2, 4, 3], [1, 0, 3]]])  # 0: a listed page holding nothing
    for g in range(2):
        for slot in range(3):
            page, held = int(idx[0, g, slot]), int(lengths[0, g, slot])
            if page >= 0:
                pool_k[page, g, held:] = 50.0
                pool_v[page, g, held:] = 1e4
    q = torch.randn(1, 4, 2, 8, generator=gen)
    out, lse = paged_attention(q, pool_k, pool_v, idx, scale=0.3, page_lengths=lengths)
    for head in range(4):
        g = head // 2
        pairs = [(int(p), int(n)) for p, n in zip(idx[0, g], lengths[0, g], strict=True)]
        keys = torch.cat([pool_k[p, g, :n] for p, n in pairs if p >= 0])
        values = torch.cat([pool_v[p, g, :n] for p, n in pairs if p >= 0])
        mask = torch.ones(2, keys.shape[0], dtype=torch.bool)
        ref, ref_lse = _dense(
            q[:, head : head + 1], keys[None, None], values[None, None], 0.3, mask
        )
        torch.testing.assert_close(out[0, head], ref[0, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[0, head], ref_lse[0, 0], rtol=1e-5, atol=1e-5)

    step = {
        "q_local": q,
        "window_k": torch.randn(1, 2, 5, 8, generator=gen),
        "window_v": torch.randn(1, 2, 5, 8, generator=gen),
        "q_memory": q,
        "sink_k": torch.randn(1, 2, 0, 8),
        "sink_v": torch.randn(1, 2, 0, 8),
        "k_pool": pool_k,
        "v_pool": pool_v,
        "page_idx": idx,
    }
    window = causal_window_attention(q, step["window_k"], step["window_v"], scale=0.3, q_start=3)
    expected, _ = merge_attention([window[0], out], [window[1], lse])
    for padded in (True, False):
        got = sparse_attention(**step, scale=0.3, padded=padded, page_lengths=lengths)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
