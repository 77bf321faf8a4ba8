"""Triton kernels against the torch reference: on CUDA, and in Triton's interpreter on CPU.

Interpreter cases run in one subprocess (TRITON_INTERPRET=1 must be set before triton is
imported and must not leak into other tests), one pytest item per case reading its result;
`python tests/test_kernels_triton.py SEED [CASE_ID ...]` runs them by hand. Every case draws
its tensors from one seed (MEMLAYER_TEST_SEED, else a fresh one) and a failure names it.
Outputs are allocated NaN-poisoned, so an element the kernel never writes cannot pass.

Tolerances, from what each side computes:
- lse: float32 on both sides from the same inputs (16-bit products are exact in float32), so
  the sides differ only by float32 rounding of logits of size |z|: a few eps32·|z|, at most
  4e-7 relative measured. The bound is 1e-5·max(1, |lse|): a 0.01 shift fails it while
  |lse| < 1000, and the cases keep |lse| below 400.
- out: each side rounds a float32 result to nearest in the output dtype, so they differ by at
  most one ulp of the larger, eps·max(|out|, |ref|), plus what the float32 results differ by:
  a logit error δz moves the softmax mean by at most δz·Σp|v − out| ≤ δz·(p·|v| + |out|),
  with δz ≤ 8·eps32·(1 + max|z|). That term is what float32 needs at large logits (about
  750 eps32 measured at |z| ≈ 250, 2 eps32 at |z| ≈ 4; 16-bit cases reach 0.99 of the bound,
  the one-ulp rounding). On CUDA a 16-bit dot also rounds p to the dtype: eps/2·p·|v| more.
- scores: float32 sums of D products on both sides: 1e-5 of Σ|terms| (√D·eps32 ≈ 1.4e-6).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import random
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import torch

from memlayer.kernels import dispatch, reference

SEED = int(os.environ.get("MEMLAYER_TEST_SEED", random.randrange(2**31)))
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
EPS32 = torch.finfo(torch.float32).eps
LSE_RTOL = 1e-5  # relative to max(1, |lse|); see the module docstring
LOGIT_ULPS = 8  # float32 rounding of a logit, in eps32·(1 + max|z|)
SCORE_RTOL = 1e-5  # relative to Σ|terms| of a score
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Logits = Literal["normal", "large", "negative"]
PagedKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _name(dtype: torch.dtype) -> str:
    """float32, float16 or bfloat16."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PagedCase:
    """One paged_attention check.

    length: query rows per head (1 is a decode step); slots: page slots per KV head;
    logits: "normal" (|z| < 5), "large" (q and k scaled 8×: |z| reaches 200-300, past float32
    exp's 88.7) or "negative" (every logit near -300, where exp is 0 in float32);
    splits: forced split-K count, None for the kernel's own choice (2 on CPU);
    partial: pages hold only their first `page_lengths` keys (`page_lengths_input`).
    """

    dtype: torch.dtype
    dim: int
    page: int
    group: int
    length: int
    slots: int
    logits: Logits = "normal"
    splits: int | None = None
    partial: bool = False

    @property
    def id(self) -> str:
        """Readable test id, e.g. bfloat16-d64-p16-g4-t1-n64-large-s3(-partial)."""
        splits = "auto" if self.splits is None else str(self.splits)
        shape = f"d{self.dim}-p{self.page}-g{self.group}-t{self.length}-n{self.slots}"
        partial = "-partial" if self.partial else ""
        return f"{_name(self.dtype)}-{shape}-{self.logits}-s{splits}{partial}"


@dataclass(frozen=True)
class ScoreCase:
    """One score_pages check of all three summary kinds over 70 pages (two page blocks)."""

    dtype: torch.dtype
    dim: int
    group: int
    length: int

    @property
    def id(self) -> str:
        """Readable test id, e.g. scores-float16-d128-g3-t1."""
        return f"scores-{_name(self.dtype)}-d{self.dim}-g{self.group}-t{self.length}"


@dataclass(frozen=True)
class WindowCase:
    """One causal_window_attention check: T queries, the last T of `keys` window keys, read
    in place from a larger buffer; `q_start` None is the causal window (keys - T), else the
    sink tokens' form (q_start = keys: every key seen)."""

    dtype: torch.dtype
    dim: int
    group: int
    length: int
    keys: int
    sinks: bool = False

    @property
    def id(self) -> str:
        """Readable test id, e.g. window-bfloat16-d64-g3-t1-k577."""
        kind = "sinks" if self.sinks else "window"
        return f"{kind}-{_name(self.dtype)}-d{self.dim}-g{self.group}-t{self.length}-k{self.keys}"


# (length, slots, logits): a prefill chunk over two row blocks when group > 2, a decode step
# over 64 pages, large logits, and a decode step whose every logit is near -300
SCENARIOS: tuple[tuple[int, int, Logits], ...] = (
    (24, 9, "normal"),
    (1, 64, "normal"),
    (2, 64, "large"),
    (1, 72, "negative"),
)
GPU_PAGED = [
    PagedCase(dtype, dim, page, group, length, slots, logits, splits)
    for dtype, dim, page, group, (length, slots, logits), splits in itertools.product(
        DTYPES, (64, 128), (16, 64, 128), (1, 3, 4), SCENARIOS, (None, 1, 3)
    )
]
GPU_PAGED += [
    PagedCase(dtype, dim, page, group, length, slots, logits, splits, partial=True)
    for dtype, dim, page, group, (length, slots, logits), splits in itertools.product(
        DTYPES, (64, 128), (16, 64), (1, 4), SCENARIOS, (None, 3)
    )
]
GPU_WINDOWS = [
    WindowCase(dtype, dim, group, length, keys, sinks)
    for dtype, dim, group, (length, keys), sinks in itertools.product(
        DTYPES, (64, 128), (1, 3, 4), ((1, 577), (512, 1088), (24, 64), (1, 7)), (False, True)
    )
]
GPU_SCORES = [ScoreCase(*c) for c in itertools.product(DTYPES, (64, 128), (1, 3, 4), (1, 24))]
# the interpreter is slow (~25 ms per 64-key step): every dtype with each logit regime, every
# dim, page size, group and split setting at least once; 64-slot cases use 16-key pages
INTERPRET_PAGED = [
    PagedCase(torch.float32, 64, 16, 1, 2, 64, "normal", 3),
    PagedCase(torch.float32, 128, 16, 4, 1, 64, "large", None),
    PagedCase(torch.float32, 64, 16, 3, 1, 64, "negative", 1),
    PagedCase(torch.float32, 64, 64, 4, 20, 9, "normal", None),  # 80 rows: two row blocks
    PagedCase(torch.float16, 128, 16, 3, 1, 64, "large", 1),
    PagedCase(torch.float16, 64, 64, 1, 3, 9, "negative", 3),
    PagedCase(torch.float16, 128, 128, 4, 2, 5, "normal", None),
    PagedCase(torch.bfloat16, 64, 16, 4, 1, 64, "large", 3),
    PagedCase(torch.bfloat16, 128, 64, 3, 7, 9, "normal", 1),  # 21 rows: a 32-row block
    PagedCase(torch.bfloat16, 64, 128, 1, 1, 5, "negative", None),
    PagedCase(torch.float32, 64, 16, 3, 2, 64, "normal", 3, partial=True),
    PagedCase(torch.bfloat16, 128, 64, 4, 1, 9, "normal", None, partial=True),
]
INTERPRET_SCORES = [
    ScoreCase(torch.float32, 64, 3, 1),
    ScoreCase(torch.float16, 128, 4, 3),
    ScoreCase(torch.bfloat16, 64, 1, 24),
]
INTERPRET_WINDOWS = [
    WindowCase(torch.float32, 64, 3, 1, 131),
    WindowCase(torch.float16, 128, 4, 20, 150),
    WindowCase(torch.bfloat16, 64, 1, 3, 64, sinks=True),
    # four row blocks; the first's latest query sees exactly key 128, the first of a block,
    # and the blocks past it are skipped
    WindowCase(torch.float32, 64, 1, 200, 201),
]
INTERPRET_CASES: list[PagedCase | ScoreCase | WindowCase] = [
    *INTERPRET_PAGED,
    *INTERPRET_SCORES,
    *INTERPRET_WINDOWS,
]


def _on_cuda(cases: list[Any]) -> list[Any]:
    """The cases on a CUDA machine; elsewhere one skipped stand-in, not one skip per case."""
    if HAS_CUDA:
        return cases
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU ({len(cases)} cases)")
    return [pytest.param(None, id="no-cuda", marks=skip)]


@contextlib.contextmanager
def _poisoned_allocations() -> Iterator[None]:
    """Make torch.empty / empty_like return NaN-filled float tensors, to expose unwritten output."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(make: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Wrap an allocator so float results come back full of NaN."""

        def allocate(*args: Any, **kwargs: Any) -> torch.Tensor:
            """Allocate, then fill floats with NaN."""
            tensor = make(*args, **kwargs)
            return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

        return allocate

    torch.empty, torch.empty_like = poison(real_empty), poison(real_like)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def paged_inputs(
    case: PagedCase, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k_pool, v_pool (CPU, case dtype) and page_idx, drawn from `seed` alone.

    About 30% of the slots are empty (-1); KV head 0 of batch 1 has its first half and its
    last slot empty (whole key blocks before the first valid one) and one valid slot; KV
    head 1 of batch 0 has none (out 0, lse -inf).
    """
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads, pool = 2, 2, case.slots + 4
    q = torch.randn(batch, kv_heads * case.group, case.length, case.dim, generator=gen)
    k_pool = torch.randn(pool, kv_heads, case.page, case.dim, generator=gen)
    v_pool = torch.randn(pool, kv_heads, case.page, case.dim, generator=gen)
    if case.logits == "large":
        q, k_pool = q * 8, k_pool * 8  # z = q·k/√D ~ N(0, 64²)
    elif case.logits == "negative":
        q[..., 0] = 16.0
        k_pool[..., 0] = -300 / 16 * case.dim**0.5  # adds -300 to every logit
    perms = [torch.randperm(pool, generator=gen)[: case.slots] for _ in range(batch * kv_heads)]
    pages = torch.stack(perms).reshape(batch, kv_heads, case.slots)
    idx = pages.clone()
    idx[torch.rand(idx.shape, generator=gen) < 0.3] = -1
    half = case.slots // 2
    idx[1, 0, :half] = -1
    idx[1, 0, -1] = -1
    idx[1, 0, half] = pages[1, 0, half]
    idx[0, 1] = -1
    return q.to(case.dtype), k_pool.to(case.dtype), v_pool.to(case.dtype), idx


def page_lengths_input(case: PagedCase, idx: torch.Tensor, seed: int) -> torch.Tensor | None:
    """Keys each listed page holds ([B, Hkv, N], from `seed` alone), None unless the case is
    partial: about a third of the pages full, the rest 0 to S − 1 keys (0: nothing read),
    and the one valid slot of batch 1's KV head 0 holding a single key."""
    if not case.partial:
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(0, case.page, idx.shape, generator=gen)
    lengths[torch.rand(idx.shape, generator=gen) < 0.33] = case.page
    lengths[1, 0, case.slots // 2] = 1
    return lengths


def _valid_logits(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    idx: torch.Tensor,
    scale: float,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every logit a query row has over a key a listed page holds, in float32 (flat)."""
    batch, kv_heads, _ = idx.shape
    heads = torch.arange(kv_heads, device=idx.device).view(1, kv_heads, 1).expand_as(idx)
    keys = k_pool[idx.clamp(min=0), heads].float()  # [B, Hkv, N, S, D]
    queries = q.float().reshape(batch, kv_heads, -1, q.shape[-1])  # [B, Hkv, G·T, D]
    logits = torch.einsum("bgrd,bgnsd->bgrns", queries, keys) * scale
    held = reference.filled(idx, k_pool.shape[2], lengths)  # [B, Hkv, N, S]
    return logits[held[:, :, None].expand_as(logits)]


def _check_premise(case: PagedCase, logits: torch.Tensor) -> None:
    """The logit regime the case claims: overflow of exp when large, underflow when negative."""
    if case.logits == "large":
        assert logits.max() > 100, f"{case.id}: largest logit {logits.max():.0f}, not > 100"
    if case.logits == "negative":
        assert logits.max() < -150, f"{case.id}: largest logit {logits.max():.0f}, not < -150"


def _out_bound(
    case: PagedCase,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    out: torch.Tensor,
    ref: torch.Tensor,
    zmax: float,
    device: str,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-element bound on |out − ref| (the module docstring derives it)."""
    q, k_pool, v_pool, idx = inputs
    eps = torch.finfo(case.dtype).eps
    mean_abs_v, _ = reference.paged_attention(
        q.float(), k_pool, v_pool.abs().float(), idx, scale=case.dim**-0.5, page_lengths=lengths
    )
    size = torch.maximum(out.float().abs(), ref.float().abs())
    logit_error = LOGIT_ULPS * EPS32 * (1 + zmax)
    bound = eps * size + logit_error * (mean_abs_v + ref.float().abs())
    if device == "cuda" and case.dtype != torch.float32:
        bound += eps / 2 * mean_abs_v
    return bound


def _worst(excess: torch.Tensor) -> str:
    """Largest error/bound ratio and where it is, for a failure message."""
    at = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
    return f"{float(excess.max()):.3g}× the bound at {at}"


def check_paged(case: PagedCase, device: str, seed: int, kernel: PagedKernel | None = None) -> None:
    """`kernel` (Triton's by default) equals the reference on the case's inputs from `seed`.

    The kernel gets `splits=` only when the case forces a split-K count, `page_lengths=`
    only when the case is partial.
    """
    if kernel is None:
        from memlayer.kernels import triton_paged

        kernel = triton_paged.paged_attention
    where = f"{case.id}, seed {seed} (replay: MEMLAYER_TEST_SEED={seed})"
    inputs = tuple(t.to(device) for t in paged_inputs(case, seed))
    q, k_pool, v_pool, idx = inputs
    lengths = page_lengths_input(case, idx, seed)
    if lengths is not None:
        lengths = lengths.to(device)
    scale = case.dim**-0.5
    logits = _valid_logits(q, k_pool, idx, scale, lengths)
    _check_premise(case, logits)
    with _poisoned_allocations():
        extra: dict[str, Any] = {} if case.splits is None else {"splits": case.splits}
        if lengths is not None:
            extra["page_lengths"] = lengths
        out, lse = kernel(q, k_pool, v_pool, idx, scale=scale, **extra)
    ref, ref_lse = reference.paged_attention(
        q, k_pool, v_pool, idx, scale=scale, page_lengths=lengths
    )
    assert out.dtype == case.dtype and out.shape == q.shape, where
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape, where
    assert out.isfinite().all(), f"NaN, inf or unwritten output: {where}"
    assert not lse.isnan().any(), f"NaN or unwritten lse: {where}"
    assert torch.equal(lse.isneginf(), ref_lse.isneginf()), f"empty rows differ: {where}"
    finite = ref_lse.isfinite()
    lse_excess = (lse[finite] - ref_lse[finite]).abs() / (
        LSE_RTOL * ref_lse[finite].abs().clamp(min=1)
    )
    assert lse_excess.max() <= 1, f"lse off by {_worst(lse_excess)}: {where}"
    bound = _out_bound(case, inputs, out, ref, float(logits.abs().max()), device, lengths)
    out_excess = (out.float() - ref.float()).abs() / bound.clamp(
        min=torch.finfo(torch.float32).tiny
    )
    assert out_excess.max() <= 1, f"out off by {_worst(out_excess)}: {where}"


def score_inputs(case: ScoreCase, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """q and one summary per kind (CPU, case dtype), drawn from `seed` alone."""
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads, pages = 2, 3, 70
    q = torch.randn(batch, kv_heads * case.group, case.length, case.dim, generator=gen)
    keys = torch.randn(pages, kv_heads, 8, case.dim, generator=gen)
    summaries = {
        "repr": keys[:, :, :4],
        "bounds": torch.stack([keys.amin(dim=2), keys.amax(dim=2)], dim=2),
        "centroid": keys[:, :, 4:7],
    }
    return q.to(case.dtype), {kind: s.to(case.dtype) for kind, s in summaries.items()}


def _term_size(q: torch.Tensor, summary: torch.Tensor, kind: reference.SummaryKind) -> torch.Tensor:
    """Σ|terms| of each score: the same reduction over |q| and |summary| (both bounds at max)."""
    size = summary.abs()
    if kind == "bounds":
        size = size.amax(dim=2, keepdim=True).expand_as(summary)
    return reference.score_pages(q.abs(), size, kind=kind)


def check_scores(case: ScoreCase, device: str, seed: int) -> None:
    """Triton score_pages equals the reference for every summary kind."""
    from memlayer.kernels import triton_paged

    where = f"{case.id}, seed {seed} (replay: MEMLAYER_TEST_SEED={seed})"
    q, summaries = score_inputs(case, seed)
    q = q.to(device)
    for kind, summary in summaries.items():
        summary = summary.to(device)
        with _poisoned_allocations():
            scores = triton_paged.score_pages(q, summary, kind=kind)
        ref = reference.score_pages(q, summary, kind=kind)
        assert scores.shape == ref.shape and scores.dtype == torch.float32, where
        assert not scores.isnan().any(), f"{kind}: NaN or unwritten score: {where}"
        excess = (scores - ref).abs() / (SCORE_RTOL * _term_size(q, summary, kind))
        assert excess.max() <= 1, f"{kind} off by {_worst(excess)}: {where}"


def check_window(case: WindowCase, device: str, seed: int) -> None:
    """Triton causal_window_attention equals the reference, reading keys in place from a
    window that starts mid-buffer (as a layer's window buffer is laid out)."""
    from memlayer.kernels import triton_paged

    where = f"{case.id}, seed {seed} (replay: MEMLAYER_TEST_SEED={seed})"
    gen = torch.Generator().manual_seed(seed)
    kv_heads, offset = 2, 37
    q = torch.randn(1, kv_heads * case.group, case.length, case.dim, generator=gen)
    buffers = torch.randn(2, kv_heads, offset + case.keys + 50, case.dim, generator=gen)
    q, buffers = q.to(device, case.dtype), buffers.to(device, case.dtype)
    k = buffers[0, :, offset : offset + case.keys][None]
    v = buffers[1, :, offset : offset + case.keys][None]
    q_start = case.keys if case.sinks else case.keys - case.length
    scale = case.dim**-0.5
    with _poisoned_allocations():
        out, lse = triton_paged.causal_window_attention(q, k, v, scale=scale, q_start=q_start)
    ref, ref_lse = reference.causal_window_attention(q, k, v, scale=scale, q_start=q_start)
    assert out.dtype == case.dtype and out.shape == q.shape, where
    assert out.isfinite().all() and lse.isfinite().all(), f"unwritten output: {where}"
    lse_excess = (lse - ref_lse).abs() / (LSE_RTOL * ref_lse.abs().clamp(min=1))
    assert lse_excess.max() <= 1, f"lse off by {_worst(lse_excess)}: {where}"
    mean_abs_v, _ = reference.causal_window_attention(
        q.float(), k.float(), v.abs().float(), scale=scale, q_start=q_start
    )
    zmax = float((q.float() @ k.float().repeat_interleave(case.group, 1).mT).abs().max()) * scale
    eps = torch.finfo(case.dtype).eps
    size = torch.maximum(out.float().abs(), ref.float().abs())
    bound = eps * size + LOGIT_ULPS * EPS32 * (1 + zmax) * (mean_abs_v + ref.float().abs())
    if device == "cuda" and case.dtype != torch.float32:
        bound += eps / 2 * mean_abs_v
    excess = (out.float() - ref.float()).abs() / bound.clamp(min=torch.finfo(torch.float32).tiny)
    assert excess.max() <= 1, f"out off by {_worst(excess)}: {where}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", _on_cuda(GPU_WINDOWS), ids=lambda c: c.id)
def test_causal_window_attention_cuda(case: WindowCase) -> None:
    """CUDA: the window and sink attention read in place through the paged kernel."""
    check_window(case, "cuda", SEED)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _on_cuda(GPU_PAGED), ids=lambda c: c.id)
def test_paged_attention_cuda(case: PagedCase) -> None:
    """CUDA: paged_attention over the full grid, automatic and forced split-K."""
    check_paged(case, "cuda", SEED)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _on_cuda(GPU_SCORES), ids=lambda c: c.id)
def test_score_pages_cuda(case: ScoreCase) -> None:
    """CUDA: score_pages for repr, bounds and centroid."""
    check_scores(case, "cuda", SEED)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_dispatch_uses_triton_on_cuda_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA tensors go to Triton; MEMLAYER_KERNELS=reference sends them to the reference."""
    q = torch.zeros(1, device="cuda")
    assert dispatch._backend(q).__name__ == "memlayer.kernels.triton_paged"
    monkeypatch.setenv("MEMLAYER_KERNELS", "reference")
    assert dispatch._backend(q) is reference


def test_cpu_tensors_use_the_reference_and_import_no_triton() -> None:
    """CPU tensors go to the reference; importing memlayer.kernels imports neither triton."""
    assert dispatch._backend(torch.zeros(1)) is reference
    code = "import sys, memlayer.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _shifted_lse(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutant: the reference with its log-sum-exp 0.01 too high."""
    out, lse = reference.paged_attention(*args, **kwargs)
    return out, lse + 0.01


def _reads_an_empty_slot(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, idx: torch.Tensor, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutant: the reference reading pool page 0 through the first (empty) slot of one head."""
    unmasked = idx.clone()
    unmasked[1, 0, 0] = 0
    return reference.paged_attention(q, k_pool, v_pool, unmasked, **kw)


def _no_max_subtraction(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutant: softmax as exp(z) / Σexp(z) in float32, no max subtracted.

    Σexp(z) = exp(lse) is inf once a logit passes ~88 and 0 when all are below ~-104.
    """
    out, lse = reference.paged_attention(*args, **kwargs)
    total = lse.exp().unsqueeze(-1)
    return (out.float() * total / total).to(out.dtype), total.squeeze(-1).log()


def _reads_past_a_page_end(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutant: the reference reading every page whole, its unused tail rows included."""
    kwargs.pop("page_lengths", None)
    return reference.paged_attention(*args, **kwargs)


MUTANTS: list[tuple[PagedKernel, PagedCase]] = [
    (_shifted_lse, PagedCase(torch.float32, 64, 16, 3, 1, 64, "normal")),
    (_shifted_lse, PagedCase(torch.bfloat16, 128, 16, 4, 2, 64, "large")),
    (_reads_an_empty_slot, PagedCase(torch.float32, 64, 16, 3, 1, 64, "normal")),
    (_reads_an_empty_slot, PagedCase(torch.bfloat16, 64, 64, 1, 3, 9, "negative")),
    (_no_max_subtraction, PagedCase(torch.float32, 128, 16, 4, 2, 64, "large")),
    (_no_max_subtraction, PagedCase(torch.float16, 64, 16, 3, 1, 64, "negative")),
    (_reads_past_a_page_end, PagedCase(torch.float32, 64, 16, 3, 1, 64, "normal", partial=True)),
    (_reads_past_a_page_end, PagedCase(torch.bfloat16, 64, 64, 4, 2, 9, "large", partial=True)),
]


@pytest.mark.parametrize(
    ("mutant", "case"), MUTANTS, ids=[f"{m.__name__}-{c.id}" for m, c in MUTANTS]
)
def test_check_fails_a_broken_kernel_and_names_the_seed_of_its_inputs(
    mutant: PagedKernel, case: PagedCase
) -> None:
    """check_paged fails each mutant, and the seed it names rebuilds the inputs it used."""
    seen: list[tuple[torch.Tensor, ...]] = []

    def recorded(*args: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The mutant, remembering the tensors it was given."""
        seen.append(args)
        return mutant(*args, **kwargs)

    check_paged(case, "cpu", SEED, kernel=reference.paged_attention)
    with pytest.raises(AssertionError) as failure:
        check_paged(case, "cpu", SEED, kernel=recorded)
    named = re.search(r"seed (\d+)", str(failure.value))
    assert named, str(failure.value)
    rebuilt = paged_inputs(case, int(named.group(1)))
    assert all(torch.equal(a, b) for a, b in zip(seen[0], rebuilt, strict=True))


def _selected_interpreter_ids(session: pytest.Session) -> list[str]:
    """Ids of the interpreter cases this pytest run selected (all of them by default)."""
    return [
        item.callspec.params["case"].id
        for item in session.items
        if isinstance(item, pytest.Function) and "interpreter_results" in item.fixturenames
    ]


@pytest.fixture(scope="module")
def interpreter_results(request: pytest.FixtureRequest) -> tuple[dict[str, str | None], str]:
    """Run the selected interpreter cases in one subprocess: {case id: error or None}, log."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install 'triton>=3.2')")
    ids = _selected_interpreter_ids(request.session)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, __file__, str(SEED), *ids],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {row["id"]: row["error"] for row in rows}, run.stdout + run.stderr


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=lambda c: c.id)
def test_interpreter_matches_reference(
    case: PagedCase | ScoreCase | WindowCase, interpreter_results: tuple[dict[str, str | None], str]
) -> None:
    """Triton interpreter on CPU: one kernel case against the reference."""
    results, log = interpreter_results
    assert case.id in results, f"{case.id}, seed {SEED}: no result; subprocess output:\n{log}"
    error = results[case.id]
    if error is not None:
        pytest.fail(error, pytrace=False)


def _interpret(seed: int, ids: list[str]) -> None:
    """Run interpreter cases (all, or those named) on CPU, one JSON result line per case."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"
    print(f"seed {seed}", flush=True)
    for case in INTERPRET_CASES:
        if ids and case.id not in ids:
            continue
        error = None
        try:
            if isinstance(case, PagedCase):
                check_paged(case, "cpu", seed)
            elif isinstance(case, WindowCase):
                check_window(case, "cpu", seed)
            else:
                check_scores(case, "cpu", seed)
        except AssertionError as failure:
            error = str(failure)
        except Exception:
            error = f"{case.id}, seed {seed}:\n{traceback.format_exc()}"
        print(json.dumps({"id": case.id, "error": error}), flush=True)


if __name__ == "__main__":
    _interpret(int(sys.argv[1]) if len(sys.argv) > 1 else SEED, sys.argv[2:])
