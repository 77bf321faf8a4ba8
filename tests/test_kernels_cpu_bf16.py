"""A prefill chunk's attention with bfloat16 products (`KVConfig.attention_dtype`,
`kernels/cpu_bf16.py`): the softmax attention of the bfloat16-rounded queries, keys and
values, to the rounding of the probabilities, for causal and plain parts, ragged shapes,
bfloat16 pools and strided heads; a session that asks for it stays within bfloat16's
rounding of dense, and one on a CPU without AVX512-BF16 computes float32 as before."""

from __future__ import annotations

from typing import Any

import kv_models
import pytest
import torch
import transformers as tf
from kv_models import COMMON, twin

from memlayer import InvalidInputError, KVSession
from memlayer.kernels import cpu_bf16, cpu_flash, dispatch, reference

needs_bf16 = pytest.mark.skipif(
    not cpu_bf16.available(), reason="this CPU (or its compiler) has no AVX512-BF16"
)


@pytest.fixture(params=[False, True], ids=["avx512", "amx-tiles"])
def tiles(request: pytest.FixtureRequest) -> Any:
    """The C kernel's products by AVX512-BF16 alone, then by AMX tiles (skipped where the CPU
    has none); the default (tiles where they are) is restored after."""
    if not cpu_bf16.use_tiles(request.param) and request.param:
        pytest.skip("this CPU has no AMX-BF16 tiles (or Linux does not grant them)")
    yield request.param
    cpu_bf16.use_tiles(True)


def _rounded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: int, causal: int | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 softmax attention of the bfloat16-rounded inputs, [1, H, R, D] and [1, H, R]."""
    q, k, v = (t.bfloat16().double() for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) * scale
    if causal is not None:
        token = torch.arange(q.shape[2]) % tokens
        hidden = torch.arange(k.shape[2])[None] > (causal + token)[:, None]
        logits = logits.masked_fill(hidden, float("-inf"))
    return torch.softmax(logits, -1) @ v, torch.logsumexp(logits, -1)


@needs_bf16
@pytest.mark.parametrize(
    ("kv_heads", "group", "tokens", "keys", "causal", "dim"),
    [
        (3, 3, 512, 1024, None, 64),  # a chunk over SmolLM2's 16 pages
        (3, 3, 512, 1024, 512, 64),  # the window: 512 keys before the chunk, then its own
        (2, 2, 37, 70, 33, 128),  # ragged rows and blocks, a wider head
        (2, 4, 5, 3, None, 64),  # fewer keys than a block
        (1, 1, 9, 200, 0, 64),  # the first rows see one key
    ],
)
def test_bfloat16_products_are_attention_of_the_rounded_inputs(
    kv_heads: int, group: int, tokens: int, keys: int, causal: int | None, dim: int, tiles: bool
) -> None:
    gen = torch.Generator().manual_seed(keys + tokens)
    q = torch.randn(1, kv_heads, group * tokens, dim, generator=gen)
    k = 2 * torch.randn(1, kv_heads, keys, dim, generator=gen)
    v = torch.randn(1, kv_heads, keys, dim, generator=gen)
    out, lse = cpu_bf16.attend(q, k, v, tokens=tokens, scale=dim**-0.5, causal=causal)
    want_out, want_lse = _rounded_attention(q, k, v, tokens, causal, dim**-0.5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-4)  # float32 logits
    # probabilities rounded to bfloat16 (8-bit mantissa) weigh the values
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=2**-8 * v.abs().max().item())


@needs_bf16
def test_bfloat16_pools_and_strided_heads_read_as_they_are(tiles: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 3 * 40, 64, generator=gen)
    buffer = torch.randn(2, 2, 300, 64, generator=gen).bfloat16()  # heads 300 rows apart
    k, v = buffer[0, :, 10:110][None], buffer[1, :, 10:110][None]
    out, lse = cpu_bf16.attend(q, k, v, tokens=40, scale=0.125)
    want_out, want_lse = _rounded_attention(q, k, v, 40, None, 0.125)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=2**-8 * 4)


@needs_bf16
def test_parts_with_their_own_queries_run_in_one_softmax(tiles: bool) -> None:
    """The window (causal, local queries) and the pages (memory queries) of one step."""
    gen = torch.Generator().manual_seed(2)
    tokens, dim = 40, 64
    q_local, q_memory = (torch.randn(1, 2, 3 * tokens, dim, generator=gen) for _ in range(2))
    window_k, window_v = (torch.randn(1, 2, 100, dim, generator=gen) for _ in range(2))
    page_k, page_v = (torch.randn(1, 2, 130, dim, generator=gen).bfloat16() for _ in range(2))
    parts = [(q_local, window_k, window_v, 60), (q_memory, page_k, page_v, None)]
    out, lse = cpu_bf16.attend_parts(parts, tokens=tokens, scale=0.125)
    rounded = [
        t.bfloat16().double() for t in (q_local, window_k, window_v, q_memory, page_k, page_v)
    ]
    local = rounded[0] @ rounded[1].transpose(-1, -2) * 0.125
    token = torch.arange(3 * tokens) % tokens
    local = local.masked_fill(torch.arange(100)[None] > (60 + token)[:, None], float("-inf"))
    logits = torch.cat([local, rounded[3] @ rounded[4].transpose(-1, -2) * 0.125], dim=-1)
    want = torch.softmax(logits, -1) @ torch.cat([rounded[2], rounded[5]], dim=2)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2**-8 * 4)


@needs_bf16
def test_no_keys_give_zero_and_a_log_sum_exp_of_minus_infinity(tiles: bool) -> None:
    q = torch.randn(1, 2, 8, 64)
    out, lse = cpu_bf16.attend(q, q[:, :, :0], q[:, :, :0], tokens=8, scale=0.125)
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.equal(lse, torch.full((1, 2, 8), float("-inf")))


def _step(mode: str, pool_dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """A prefill step's inputs: 3 KV heads of 3 query heads, a 64-token chunk at the end of a
    200-key window, 20 sinks, 4 of 10 pages of 64 tokens per head (`mode`: all full, one
    padded with -1, or held in part)."""
    gen = torch.Generator().manual_seed(7)
    tokens, dim = 64, 64

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    q_local, q_memory = rand(1, 9, tokens, dim), rand(1, 9, tokens, dim)
    window_k, window_v, sink_k, sink_v = (rand(1, 3, n, dim) for n in (200, 200, 20, 20))
    k_pool, v_pool = (rand(10, 3, 64, dim).to(pool_dtype) for _ in range(2))
    page_idx = torch.stack([torch.randperm(10, generator=gen)[:4].sort().values for _ in range(3)])
    options: dict[str, Any] = {"scale": dim**-0.5, "padded": mode == "padded"}
    if mode == "padded":
        page_idx[1, -1] = -1
    if mode == "lengths":
        options["page_lengths"] = torch.randint(1, 65, (1, 3, 4), generator=gen)
    tensors = (q_local, window_k, window_v, q_memory, sink_k, sink_v, k_pool, v_pool)
    return (*tensors, page_idx[None]), options


@needs_bf16
@pytest.mark.parametrize("mode", ["full", "padded", "lengths"])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", [False, True])
def test_a_prefill_step_with_bfloat16_products_is_the_step_within_their_rounding(
    mode: str, pool_dtype: torch.dtype, tiles: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the C call, or (`tiles`: a CPU with AMX) through torch's flash attention on
    bfloat16 copies, every part of it in bfloat16."""
    monkeypatch.setattr(cpu_flash, "torch_tiles", lambda: tiles)
    flash, seen = cpu_flash._FLASH, []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[0].dtype)
        return flash(*args, **kwargs)

    tensors, options = _step(mode, pool_dtype)
    want = reference.sparse_attention(*tensors, **options)
    plain = cpu_flash.sparse_attention(*tensors, **options)
    monkeypatch.setattr(cpu_flash, "_FLASH", recorded)
    fast = cpu_flash.sparse_attention(*tensors, **options, bf16_products=True)
    assert set(seen) == (
        {torch.bfloat16} if tiles else {torch.float32} if mode != "full" else set()
    )
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5)
    assert fast.dtype == torch.float32
    error = (fast - want).abs().max().item()
    assert 1e-4 < error < 2**-7  # rounded to bfloat16 (float32 is 1e-6 off), no further


@needs_bf16
def test_merge_is_the_softmax_merge_of_parts_in_either_layout() -> None:
    """Grouped parts [1, Hkv, G·T, D] and a per-query-head one [1, Hkv·G, T, D], with
    torch's transposed strides, merge to `merge_attention` of the same parts within float32
    rounding; a row one part never saw takes the others, a row none saw is 0 and -inf."""
    gen = torch.Generator().manual_seed(3)
    kv_heads, groups, tokens, dim = 2, 3, 5, 64

    def grouped_part() -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.randn(1, groups * tokens, kv_heads, dim, generator=gen).bfloat16()
        lse = torch.randn(1, groups * tokens, kv_heads, generator=gen) * 4
        return out.transpose(1, 2), lse.transpose(1, 2)

    per_head = (
        torch.randn(1, kv_heads * groups, tokens, dim, generator=gen).bfloat16(),
        torch.randn(1, kv_heads * groups, tokens, generator=gen) * 4,
    )
    parts = [grouped_part(), per_head, grouped_part()]
    parts[0][1][0, 1, 4] = float("-inf")  # row (1, 4): one part saw nothing
    for _, lse in parts[::2]:
        lse[0, 0, 2] = float("-inf")
    per_head[1][0, 0, 2] = float("-inf")  # row (0, 2): no part saw anything
    merged, total = cpu_bf16.merge(parts, kv_heads=kv_heads, tokens=tokens)
    outs = [out.reshape(1, kv_heads, groups * tokens, dim).float() for out, _ in parts]
    lses = [lse.reshape(1, kv_heads, groups * tokens) for _, lse in parts]
    want, want_total = reference.merge_attention(outs, lses)
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, want_total, rtol=1e-6, atol=1e-6)
    assert torch.equal(merged[0, 0, 2], torch.zeros(dim)) and total[0, 0, 2] == float("-inf")
    with pytest.raises(ValueError, match="bfloat16 outputs"):
        cpu_bf16.merge([(outs[0], lses[0])], kv_heads=kv_heads, tokens=tokens)


def _model(seed: int = 0) -> Any:
    """A tiny Llama with SmolLM2's head size (64), which the kernel takes."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(**{**COMMON, "hidden_size": 128, "head_dim": 64})
    config._attn_implementation = "sdpa"
    return tf.LlamaForCausalLM(config).eval()


# every page selected at its true position (kv_models.EXACT), in blocks the kernel's 64 rows fill
EXACT = {**kv_models.EXACT, "n_local": 64, "block_size": 16, "chunk_size": 64}


def _logits(model: Any, ids: torch.Tensor, **config: Any) -> torch.Tensor:
    session = KVSession(twin(model), None, progress=False, **{**EXACT, **config})
    logits: torch.Tensor = session._forward(ids[0].tolist(), all_logits=True)
    assert session.stats()["pages"] > 0
    return logits


@needs_bf16
def test_a_session_with_bfloat16_products_is_dense_within_bfloat16_rounding() -> None:
    dense = _model()
    ids = torch.randint(0, 96, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = dense(ids).logits[0]
    wide = _logits(dense, ids, attention_dtype="model")
    narrow = _logits(dense, ids)  # the default: bfloat16 products where the CPU has them
    torch.testing.assert_close(wide, expected, rtol=1e-5, atol=1e-5)
    error = (narrow - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert 1e-4 * scale < error < 2**-7 * scale  # rounded (float32 is 1e-6 off), no further


def test_without_avx512_bf16_a_session_computes_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    dense = _model()
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(4))
    wide = _logits(dense, ids, attention_dtype="model")
    monkeypatch.setattr(cpu_bf16, "library", lambda: None)
    assert torch.equal(_logits(dense, ids), wide)


def test_an_unknown_attention_dtype_is_refused_by_name() -> None:
    with pytest.raises(InvalidInputError, match="attention_dtype"):
        KVSession(_model(), None, progress=False, attention_dtype="float16")


def _bounds(pages: int, tokens: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's queries [1, 9, tokens, dim] and Quest summaries [pages, 3, 2, dim]."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(pages, 3, 16, dim, generator=gen)
    q = torch.randn(1, 9, tokens, dim, generator=gen)
    return q, torch.stack([keys.amin(dim=2), keys.amax(dim=2)], dim=2)


@needs_bf16
@pytest.mark.parametrize(
    ("pages", "tokens", "dim"),
    [(500, 512, 64), (37, 5, 64), (70, 33, 128), (3, 40, 32), (0, 40, 64), (130, 47, 64)],
)
def test_quest_bounds_with_bfloat16_products_are_the_bounds_of_the_rounded_inputs(
    pages: int, tokens: int, dim: int, tiles: bool
) -> None:
    q, summary = _bounds(pages, tokens, dim)
    scores = cpu_bf16.bounds_scores(q, summary)
    want = reference.score_pages(q.bfloat16().float(), summary.bfloat16().float(), kind="bounds")
    assert scores.shape == want.shape == (1, 3, pages)
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)  # float32 sums


@needs_bf16
def test_quest_bounds_below_zero_are_kept(tiles: bool) -> None:
    """Keys opposite every query: each bound is negative, and no padding of the query rows
    (tiles take them 32 at a time) may lift it to zero."""
    q, summary = _bounds(70, 5, 64, seed=5)
    q, summary = q.abs(), -summary.abs() - 0.1
    scores = cpu_bf16.bounds_scores(q, summary)
    want = reference.score_pages(q.bfloat16().float(), summary.bfloat16().float(), kind="bounds")
    assert (want < 0).all()
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)


@needs_bf16
@pytest.mark.parametrize(
    ("pages", "k", "seed"), [(600, 16, 0), (1000, 16, 1), (2000, 4, 2), (700, 8, 3)]
)
def test_pruned_quest_bounds_pick_the_pages_the_full_bounds_pick(
    pages: int, k: int, seed: int, tiles: bool
) -> None:
    """Pages of widely different key scales, so whole groups fall below a head's k-th best:
    the scores computed are the full ones, the others -inf, and the top k is the same."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(pages, 1, 1, 1, generator=gen) ** 4 * 3
    keys = torch.randn(pages, 3, 64, 64, generator=gen) * scale
    summary = torch.stack([keys.amin(dim=2), keys.amax(dim=2)], dim=2)
    q = torch.randn(1, 9, 512, 64, generator=gen)
    full = cpu_bf16.bounds_scores(q, summary)
    pruned = cpu_bf16.bounds_scores(q, summary, k)
    kept = torch.isfinite(pruned)
    assert torch.equal(pruned[kept], full[kept])
    assert 0 < kept.float().mean() < 1  # some pages skipped, none of a head's top k
    assert torch.equal(reference.select_pages(pruned, k), reference.select_pages(full, k))


@needs_bf16
def test_quest_bounds_of_few_pages_are_all_computed() -> None:
    q, summary = _bounds(cpu_bf16.PRUNE_FROM - 1, 64, 64, seed=4)
    assert torch.equal(cpu_bf16.bounds_scores(q, summary, 16), cpu_bf16.bounds_scores(q, summary))


@needs_bf16
def test_bfloat16_queries_select_quest_pages_as_their_rounded_bounds_rank_them() -> None:
    q, summary = _bounds(300, 64, 64, seed=2)
    chosen = dispatch.select_pages_bounds(q.bfloat16(), summary, 16)
    rounded = reference.score_pages(q.bfloat16().float(), summary.bfloat16().float(), kind="bounds")
    assert torch.equal(chosen, reference.select_pages(rounded, 16))


@needs_bf16
@pytest.mark.parametrize("attention_dtype", ["model", "bfloat16"])
def test_a_quest_chunk_scores_with_bfloat16_products_only_when_asked(
    attention_dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    scores = cpu_bf16.bounds_scores

    def counted(q: torch.Tensor, summary: torch.Tensor, k: int | None = None) -> torch.Tensor:
        calls.append(q.dtype)
        return scores(q, summary, k)

    monkeypatch.setattr(cpu_bf16, "bounds_scores", counted)
    session = KVSession(
        _model(), None, progress=False, selector="quest", attention_dtype=attention_dtype,
        n_init=3, n_local=64, block_size=16, topk=2, chunk_size=64,
    )  # fmt: skip
    session.feed(torch.randint(0, 96, (400,), generator=torch.Generator().manual_seed(1)).tolist())
    if attention_dtype == "bfloat16":  # every chunk past the first pages, rounded queries
        assert calls and set(calls) == {torch.bfloat16}
    else:
        assert calls == []
