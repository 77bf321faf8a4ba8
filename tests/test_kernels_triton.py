"""Triton kernels against the torch reference: on CUDA, and in Triton's interpreter on CPU.

The interpreter run is a subprocess (TRITON_INTERPRET=1 must be set before triton is imported
and must not leak into other tests): `python tests/test_kernels_triton.py SEED` runs it by hand.
Seed: MEMLAYER_TEST_SEED, else a fresh one, printed. Outputs are allocated NaN-poisoned.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from memlayer.kernels import dispatch, reference

SEED = int(os.environ.get("MEMLAYER_TEST_SEED", random.randrange(2**31)))
print(f"test_kernels_triton seed: {SEED} (set MEMLAYER_TEST_SEED to replay)")
BOUND = 2e-2  # relative error of a bf16 result
DTYPES = (torch.bfloat16, torch.float16)
CASES = list(itertools.product(DTYPES, (64, 128), (16, 64, 128), (1, 3, 4)))  # dtype dim page group
# the interpreter is slow: every dtype, dim, page size and group at least once, 6 cases
INTERPRET_CASES = [
    (torch.bfloat16, 64, 16, 1),
    (torch.float16, 128, 16, 3),
    (torch.bfloat16, 128, 64, 4),
    (torch.float16, 64, 64, 1),
    (torch.bfloat16, 64, 128, 3),
    (torch.float16, 128, 128, 4),
]
HAS_TRITON = importlib.util.find_spec("triton") is not None


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


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float32."""
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def check_paged(
    case: tuple[torch.dtype, int, int, int], device: str, splits: int | None, seed: int
) -> None:
    """Triton paged_attention equals the reference, empty slots and an all-empty head included."""
    from memlayer.kernels import triton_paged

    dtype, dim, page, group = case
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads, length, pool, slots = 2, 2, 2, 9, 5
    q = torch.randn(batch, kv_heads * group, length, dim, generator=gen)
    k_pool = torch.randn(pool, kv_heads, page, dim, generator=gen)
    v_pool = torch.randn(pool, kv_heads, page, dim, generator=gen)
    idx = torch.stack([torch.randperm(pool, generator=gen)[:slots] for _ in range(4)])
    idx = idx.reshape(batch, kv_heads, slots)
    idx[torch.rand(idx.shape, generator=gen) < 0.3] = -1
    idx[0, 1] = -1  # a KV head with nothing selected: out 0, lse -inf
    idx[1, 0, 0] = 3  # at least one valid slot elsewhere
    q, k_pool, v_pool = (t.to(device=device, dtype=dtype) for t in (q, k_pool, v_pool))
    idx = idx.to(device)
    with _poisoned_allocations():
        out, lse = triton_paged.paged_attention(
            q, k_pool, v_pool, idx, scale=dim**-0.5, splits=splits
        )
    ref, ref_lse = reference.paged_attention(q, k_pool, v_pool, idx, scale=dim**-0.5)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten or NaN output"
    assert _rel(out, ref) < BOUND, (case, splits, _rel(out, ref))
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    finite = ref_lse.isfinite()
    assert (lse[finite] - ref_lse[finite]).abs().max() < BOUND, case
    assert (out[0, group : 2 * group] == 0).all()


def check_scores(case: tuple[torch.dtype, int, int, int], device: str, seed: int) -> None:
    """Triton score_pages equals the reference for every summary kind."""
    from memlayer.kernels import triton_paged

    dtype, dim, _, group = case
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads, length, pages = 2, 3, 3, 70
    q = torch.randn(batch, kv_heads * group, length, dim, generator=gen)
    keys = torch.randn(pages, kv_heads, 8, dim, generator=gen)
    summaries = {
        "repr": keys[:, :, :4],
        "bounds": torch.stack([keys.amin(dim=2), keys.amax(dim=2)], dim=2),
        "centroid": keys[:, :, 4:7],
    }
    q = q.to(device=device, dtype=dtype)
    for kind, summary in summaries.items():
        summary = summary.to(device=device, dtype=dtype)
        with _poisoned_allocations():
            scores = triton_paged.score_pages(q, summary, kind=kind)
        ref = reference.score_pages(q, summary, kind=kind)
        assert scores.shape == ref.shape and scores.dtype == torch.float32
        assert not scores.isnan().any(), kind
        assert _rel(scores, ref) < 1e-3, (case, kind, _rel(scores, ref))


def _ids(case: tuple[torch.dtype, int, int, int]) -> str:
    """Readable test id of a case."""
    dtype, dim, page, group = case
    return f"{str(dtype).removeprefix('torch.')}-d{dim}-p{page}-g{group}"


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_paged_attention_cuda(case: tuple[torch.dtype, int, int, int], splits: int | None) -> None:
    """CUDA: paged_attention over the full grid, automatic and forced split-K."""
    check_paged(case, "cuda", splits, SEED)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_score_pages_cuda(case: tuple[torch.dtype, int, int, int]) -> None:
    """CUDA: score_pages for repr, bounds and centroid."""
    check_scores(case, "cuda", SEED)


@pytest.mark.gpu
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


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'triton>=3.2')")
def test_interpreter_matches_reference() -> None:
    """Triton interpreter on CPU: both kernels on the covering cases (subprocess, ~10 s)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, __file__, str(SEED)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr


def _interpret(seed: int) -> None:
    """Run the interpreter cases on CPU (called with TRITON_INTERPRET=1 in the environment)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"
    for number, case in enumerate(INTERPRET_CASES):
        check_paged(case, "cpu", (1, 3, None)[number % 3], seed + number)
        check_scores(case, "cpu", seed + number)
        print("ok", _ids(case))


if __name__ == "__main__":
    _interpret(int(sys.argv[1]) if len(sys.argv) > 1 else SEED)
