"""A CPU chunk of many queries runs a layer's step through PyTorch's CPU flash attention by
parts (`kernels/cpu_flash.py`): the same attention as the reference's one softmax, for every
mix of window, sinks, pages, padded and partly filled pages; a decode step of a batch of two
stays on the reference (one of batch 1 goes to `cpu_decode`), and MEMLAYER_KERNELS=reference
forces it."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from memlayer.kernels import cpu_flash, dispatch, reference

CASES = list(itertools.product((32, 45), (0, 4), (0, 3), ("full", "padded", "lengths")))


def _inputs(
    length: int, pages: int, sinks: int, mode: str, dtype: torch.dtype, seed: int
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """Step inputs: batch 2, 6 query heads over 3 KV heads, head dim 16, a window of
    `length` + 20 keys, `sinks` sink tokens, `pages` of 4 tokens from a pool of 9."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    keys = length + 20
    page_idx = torch.randint(0, 9, (2, 3, pages), generator=gen)
    options: dict[str, Any] = {"scale": 0.25, "padded": mode == "padded", "page_lengths": None}
    if mode == "padded" and pages:
        page_idx[0, 1] = -1  # a head with no page at all
        page_idx[1, 0, 0] = -1
    if mode == "lengths" and pages:
        lengths = torch.randint(0, 5, (2, 3, pages), generator=gen)
        lengths[1, 2] = 0  # a head whose pages hold nothing
        options["page_lengths"] = lengths
    tensors = (
        rand(2, 6, length, 16),
        rand(2, 3, keys, 16),
        rand(2, 3, keys, 16),
        rand(2, 6, length, 16),
        rand(2, 3, sinks, 16),
        rand(2, 3, sinks, 16),
        rand(9, 3, 4, 16),
        rand(9, 3, 4, 16),
        page_idx,
    )
    return tensors, options


@pytest.mark.parametrize(("length", "pages", "sinks", "mode"), CASES)
def test_flash_parts_equal_the_reference_in_float32(
    length: int, pages: int, sinks: int, mode: str
) -> None:
    tensors, options = _inputs(length, pages, sinks, mode, torch.float32, seed=length + pages)
    expected = reference.sparse_attention(*tensors, **options)
    got = cpu_flash.sparse_attention(*tensors, **options)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "padded", "lengths"])
def test_flash_parts_equal_the_reference_in_bfloat16(mode: str) -> None:
    tensors, options = _inputs(40, 4, 3, mode, torch.bfloat16, seed=5)
    expected = reference.sparse_attention(*tensors, **options).float()
    got = cpu_flash.sparse_attention(*tensors, **options)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2


def test_a_chunk_goes_to_flash_a_decode_step_to_the_reference_unless_forced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    for name, module in (("flash", cpu_flash), ("reference", reference)):
        real = module.sparse_attention
        monkeypatch.setattr(
            module,
            "sparse_attention",
            lambda *a, _name=name, _real=real, **k: calls.append(_name) or _real(*a, **k),
        )
    chunk, options = _inputs(cpu_flash.FLASH_FROM, 4, 3, "full", torch.float32, seed=1)
    step, _ = _inputs(1, 4, 3, "full", torch.float32, seed=1)
    dispatch.sparse_attention(*chunk, **options)
    dispatch.sparse_attention(*step, **options)
    wide, _ = _inputs(cpu_flash.FLASH_FROM, 4, 3, "full", torch.float64, seed=1)
    dispatch.sparse_attention(*wide, **options)  # float64: a dtype the kernel does not take
    monkeypatch.setenv("MEMLAYER_KERNELS", "reference")
    dispatch.sparse_attention(*chunk, **options)
    assert calls == ["flash", "reference", "reference", "reference"]
