"""A CPU decode step (a few queries, batch 1, float32; pages in float32 or bfloat16) runs a
layer's attention in one fused C call (`kernels/cpu_decode.py`): the same attention as the
reference's one softmax, for every mix of window, sinks, pages, padded and partly filled
pages, head sizes and thread counts, with the window and sinks read in place from views into
larger buffers."""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
import torch

from memlayer.kernels import cpu_decode, dispatch, reference

pytestmark = pytest.mark.skipif(
    cpu_decode.library() is None and not os.environ.get("CI"),
    reason="no C compiler: the kernel cannot be built here (CI installs one and runs these)",
)

CASES = list(
    itertools.product(
        (1, 3, 17),  # tokens
        (0, 70),  # sink tokens (70: more than one piece of 64 keys)
        (0, 5),  # pages listed
        ("full", "padded", "lengths"),
        (150, 130),  # window keys: with 130, the last piece (2 keys) is after early tokens
    )
)


def _inputs(
    tokens: int,
    sinks: int,
    pages: int,
    mode: str,
    *,
    group: int = 3,
    dim: int = 64,
    page: int = 80,
    window: int = 150,
    seed: int = 0,
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """Step inputs: 2 KV heads with `group` query heads each, a window of `window` keys and
    `sinks` sink tokens as views into buffers twice as long (as a layer keeps them), `pages`
    of `page` tokens listed per head from a pool of 12."""
    gen = torch.Generator().manual_seed(seed)
    kv_heads = 2

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def buffered(count: int) -> torch.Tensor:  # [1, Hkv, count, D], a view at an offset
        return rand(kv_heads, 2 * count + 7, dim)[:, 5 : 5 + count][None]

    page_idx = torch.randperm(12, generator=gen)[: pages * kv_heads].view(1, kv_heads, pages)
    options: dict[str, Any] = {"scale": dim**-0.5, "padded": mode == "padded"}
    if mode == "padded" and pages:
        page_idx[0, 1] = -1  # a head with no page at all
        page_idx[0, 0, 2] = -1
    if mode == "lengths" and pages:
        lengths = torch.randint(0, page + 1, (1, kv_heads, pages), generator=gen)
        lengths[0, 1, 0] = 0  # a page that holds nothing
        lengths[0, 0, 1] = page
        options["page_lengths"] = lengths
    tensors = (
        rand(1, kv_heads * group, tokens, dim),
        buffered(window),
        buffered(window),
        rand(1, kv_heads * group, tokens, dim),
        buffered(sinks),
        buffered(sinks),
        rand(12, kv_heads, page, dim),
        rand(12, kv_heads, page, dim),
        page_idx,
    )
    return tensors, options


def _check(tensors: tuple[torch.Tensor, ...], options: dict[str, Any]) -> None:
    expected = reference.sparse_attention(*tensors, **options)
    got = cpu_decode.sparse_attention(*tensors, **options)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("tokens", "sinks", "pages", "mode", "window"), CASES)
def test_fused_step_equals_the_reference(
    tokens: int, sinks: int, pages: int, mode: str, window: int
) -> None:
    _check(*_inputs(tokens, sinks, pages, mode, window=window, seed=tokens + sinks + pages))


@pytest.mark.parametrize("dim", [16, 48, 128, 256])
def test_every_head_size_a_multiple_of_16(dim: int) -> None:
    _check(*_inputs(2, 3, 4, "lengths", dim=dim, seed=dim))


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_any_thread_count_gives_the_same_attention(threads: int) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(*_inputs(1, 70, 5, "padded", group=1, page=64, window=400, seed=threads))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(
    ("mode", "dim"), itertools.product(("full", "padded", "lengths"), (64, 48, 128))
)
def test_bfloat16_pages_are_read_as_the_float32_they_stand_for(mode: str, dim: int) -> None:
    """Pages kept in bfloat16 under a float32 model (`KVConfig.page_dtype`): the kernel
    widens them as it reads, so it equals the reference on the same bfloat16 pages."""
    tensors, options = _inputs(3, 70, 5, mode, dim=dim, seed=dim + len(mode))
    narrow = (*tensors[:6], tensors[6].bfloat16(), tensors[7].bfloat16(), tensors[8])
    assert cpu_decode.handles(narrow[0], narrow[1], narrow[6])
    _check(narrow, options)


def test_queries_placed_once_for_both_window_and_memory() -> None:
    (q, *rest), options = _inputs(1, 3, 4, "full", seed=9)
    tensors = (q, rest[0], rest[1], q, *rest[3:])  # exact positions: q_memory is q_local
    _check(tuple(tensors), options)


def _record_calls(monkeypatch: pytest.MonkeyPatch, function: str) -> list[str]:
    """The names ("fused", "reference") of the modules whose `function` runs, in order."""
    calls: list[str] = []
    for name, module in (("fused", cpu_decode), ("reference", reference)):
        real = getattr(module, function)
        monkeypatch.setattr(
            module,
            function,
            lambda *a, _name=name, _real=real, **k: calls.append(_name) or _real(*a, **k),
        )
    return calls


def test_a_batch_one_float32_step_goes_to_the_kernel_others_to_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _record_calls(monkeypatch, "sparse_attention")
    tensors, options = _inputs(1, 3, 4, "full")
    dispatch.sparse_attention(*tensors, **options)
    wide = tuple(t.double() if t.is_floating_point() else t for t in tensors)
    dispatch.sparse_attention(*wide, **options)  # float64: a dtype the kernel does not take
    many, _ = _inputs(1, 3, 4, "full", group=cpu_decode.MAX_ROWS + 1)
    dispatch.sparse_attention(*many, **options)  # more query rows than the kernel keeps
    monkeypatch.setenv("MEMLAYER_KERNELS", "reference")
    dispatch.sparse_attention(*tensors, **options)
    assert calls == ["fused", "reference", "reference", "reference"]


def test_without_a_compiler_dispatch_keeps_the_reference(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MEMLAYER_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_decode, "_BUILT", {})
    cpu_decode.library.cache_clear()
    try:
        assert cpu_decode.library() is None
        tensors, options = _inputs(1, 3, 4, "full")
        assert not cpu_decode.handles(tensors[0], tensors[1], tensors[6])
        torch.testing.assert_close(
            dispatch.sparse_attention(*tensors, **options),
            reference.sparse_attention(*tensors, **options),
        )
    finally:
        cpu_decode.library.cache_clear()


@pytest.mark.parametrize(
    ("pages", "k", "tokens", "heads", "dim"),
    [
        (40, 16, 1, (9, 3), 64),
        (300, 16, 1, (9, 3), 64),
        (300, 8, 3, (4, 2), 128),
        (5000, 32, 1, (8, 2), 64),
    ],
)
def test_shared_selection_equals_the_reference(
    pages: int, k: int, tokens: int, heads: tuple[int, int], dim: int
) -> None:
    """InfLLM's and ReKV's selection in one C call picks the same pages, in the same order
    (5,000 pages: the scores are computed on several threads)."""
    gen = torch.Generator().manual_seed(pages + k)
    q = torch.randn(1, heads[0], tokens, dim, generator=gen)
    summary = torch.randn(pages, heads[1], 1, dim, generator=gen)
    assert cpu_decode.handles_selection(q, summary)
    got = cpu_decode.select_pages_summed(q, summary, k)
    assert torch.equal(got, reference.select_pages_summed(q, summary, k))


def test_shared_selection_of_fewer_pages_than_k_takes_them_all_and_pads() -> None:
    q, summary = torch.randn(1, 9, 1, 64), torch.randn(5, 3, 1, 64)
    got = cpu_decode.select_pages_summed(q, summary, 8)
    assert got.tolist() == [[[0, 1, 2, 3, 4, -1, -1, -1]]]
    assert torch.equal(got, reference.select_pages_summed(q, summary, 8))


def test_pages_scoring_the_same_keep_the_lower_index() -> None:
    q = torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(4))
    row = q.view(3, 3, 64).sum(dim=1).view(1, 3, 1, 64)  # scores Σ|q|² > 0
    summary = row.expand(10, -1, -1, -1).contiguous()  # ten pages scoring the same
    assert cpu_decode.select_pages_summed(q, summary, 3).tolist() == [[[0, 1, 2]]]
    summary[7] *= 2  # one page scores higher than the rest
    assert cpu_decode.select_pages_summed(q, summary, 3).tolist() == [[[0, 1, 7]]]


def test_a_float32_selection_goes_to_the_kernel_others_to_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _record_calls(monkeypatch, "select_pages_summed")
    q, summary = torch.randn(1, 9, 1, 64), torch.randn(20, 3, 1, 64)
    dispatch.select_pages_summed(q, summary, 4)
    dispatch.select_pages_summed(q.bfloat16(), summary.bfloat16(), 4)  # not float32
    dispatch.select_pages_summed(q, torch.randn(20, 3, 2, 64), 4)  # two rows a page
    monkeypatch.setenv("MEMLAYER_KERNELS", "reference")
    dispatch.select_pages_summed(q, summary, 4)
    assert calls == ["fused", "reference", "reference", "reference"]


def _bounds(pages: int, kv_heads: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Quest summaries [P, Hkv, 2, D]: each channel's min, then its max."""
    return torch.randn(pages, kv_heads, 2, dim, generator=gen).sort(dim=2).values.contiguous()


@pytest.mark.parametrize(
    ("pages", "k", "tokens", "heads", "dim"),
    [
        (40, 16, 1, (9, 3), 64),
        (300, 16, 1, (9, 3), 64),
        (300, 8, 3, (4, 2), 128),
        (120, 4, 1, (2, 2), 16),
        (5000, 32, 1, (8, 2), 64),
    ],
)
def test_quest_selection_equals_the_reference(
    pages: int, k: int, tokens: int, heads: tuple[int, int], dim: int
) -> None:
    """Quest's bounds and per-head top-k in one C call pick the reference's pages, in its
    order, for every KV head (300 and 5,000 pages: the scores are computed on threads)."""
    gen = torch.Generator().manual_seed(pages + k + dim)
    q = torch.randn(1, heads[0], tokens, dim, generator=gen)
    summary = _bounds(pages, heads[1], dim, gen)
    assert cpu_decode.handles_bounds(q, summary)
    got = cpu_decode.select_pages_bounds(q, summary, k)
    assert got.shape == (1, heads[1], k)
    assert torch.equal(got, reference.select_pages_bounds(q, summary, k))


def test_quest_selection_is_per_head_and_pads_past_the_pages() -> None:
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 9, 1, 64, generator=gen)
    summary = _bounds(6, 3, 64, gen) * 0.01
    summary[4, 1, 1] = q[0, 3:6, 0].clamp(min=0).amax(dim=0) * 10  # head 1's max bound high
    got = cpu_decode.select_pages_bounds(q, summary, 8)
    assert torch.equal(got, reference.select_pages_bounds(q, summary, 8))
    assert got[0, :, 6:].eq(-1).all() and got[0, :, :6].sort().values.eq(torch.arange(6)).all()
    got = cpu_decode.select_pages_bounds(q, summary, 1)
    assert got[0, 1].tolist() == [4] and torch.equal(
        got, reference.select_pages_bounds(q, summary, 1)
    )


def test_quest_pages_scoring_the_same_keep_the_lower_index() -> None:
    q = torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(5))
    summary = _bounds(1, 3, 64, torch.Generator().manual_seed(6)).expand(10, -1, -1, -1)
    summary = summary.contiguous()  # ten pages with the same bounds
    assert cpu_decode.select_pages_bounds(q, summary, 3).tolist() == [[[0, 1, 2]] * 3]
    summary[7, :, 1] += 1  # a higher max in every channel: page 7 bounds higher for all heads
    assert cpu_decode.select_pages_bounds(q, summary, 3).tolist() == [[[0, 1, 7]] * 3]


def test_a_float32_quest_decode_selection_goes_to_the_kernel_others_to_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _record_calls(monkeypatch, "select_pages_bounds")
    gen = torch.Generator().manual_seed(3)
    q, summary = torch.randn(1, 9, 1, 64, generator=gen), _bounds(20, 3, 64, gen)
    chunk = torch.randn(1, 9, cpu_decode.BOUNDS_MAX_TOKENS + 1, 64, generator=gen)
    cases = [
        (q, summary),
        (q.bfloat16(), summary.bfloat16()),  # not float32
        (chunk, summary),  # a prefill chunk: a matmul per KV head in torch
    ]
    for query, bounds in cases:
        dispatch.select_pages_bounds(query, bounds, 4)
    monkeypatch.setenv("MEMLAYER_KERNELS", "reference")
    dispatch.select_pages_bounds(q, summary, 4)
    assert calls == ["fused"]  # torch's path scores through `dispatch.score_pages`
