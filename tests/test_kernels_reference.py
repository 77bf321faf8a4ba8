"""Reference kernels against plain dense softmax attention: exact merges, paged gathers, scoring."""

from __future__ import annotations

import pytest
import torch

from memlayer.kernels import (
    causal_window_attention,
    merge_attention,
    paged_attention,
    score_pages,
    select_pages,
)


def _dense(q, k, v, scale, mask):
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    logits = (q.float() @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v, torch.logsumexp(logits, dim=-1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def test_window_attention_matches_dense(gen) -> None:
    q = torch.randn(2, 6, 5, 16, generator=gen)
    k = torch.randn(2, 2, 12, 16, generator=gen)
    v = torch.randn(2, 2, 12, 16, generator=gen)
    out, lse = causal_window_attention(q, k, v, scale=0.25, q_start=7, window=4)
    pos_q = torch.arange(5).unsqueeze(1) + 7
    pos_k = torch.arange(12).unsqueeze(0)
    mask = (pos_k <= pos_q) & (pos_k > pos_q - 4)
    ref, ref_lse = _dense(q, k, v, 0.25, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_paged_plus_local_merge_equals_dense_over_the_union(gen) -> None:
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


def test_empty_parts_contribute_nothing(gen) -> None:
    q = torch.randn(1, 2, 2, 8, generator=gen)
    pool = torch.randn(3, 1, 4, 8, generator=gen)
    empty = paged_attention(q, pool, pool, torch.full((1, 1, 2), -1), scale=1.0)
    assert torch.isinf(empty[1]).all() and (empty[0] == 0).all()
    local = causal_window_attention(q, pool[:1], pool[:1], scale=1.0, q_start=3)
    merged = merge_attention([empty[0], local[0]], [empty[1], local[1]])
    torch.testing.assert_close(merged[0], local[0])


def test_bf16_inputs_keep_their_dtype(gen) -> None:
    q = torch.randn(1, 2, 1, 8, generator=gen).bfloat16()
    pool = torch.randn(3, 1, 4, 8, generator=gen).bfloat16()
    out, lse = paged_attention(q, pool, pool, torch.tensor([[[0, 2]]]), scale=0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_scoring_and_selection_pick_the_aligned_page(gen) -> None:
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


def test_quest_bound_is_an_upper_bound(gen) -> None:
    q = torch.randn(1, 2, 1, 8, generator=gen)
    keys = torch.randn(5, 1, 16, 8, generator=gen)
    bounds = torch.stack([keys.amin(dim=2), keys.amax(dim=2)], dim=2)
    upper = score_pages(q, bounds, kind="bounds")[0, 0]
    actual = torch.einsum("htd,psd->hps", q[0, :, :, :], keys[:, 0]).amax(dim=(0, 2))
    assert (upper >= actual - 1e-5).all()


def test_selection_pads_when_pages_are_few() -> None:
    chosen = select_pages(torch.tensor([[[0.3, 0.9]]]), 4)
    assert chosen.tolist() == [[[0, 1, -1, -1]]]
