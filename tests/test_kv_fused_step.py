"""A CPU decode step taken in one C call (`memlayer.kernels.decode_layer`: query placement,
selection, page table and attention) and the token's window write in another (`window_put`)
give bit for bit what the same steps give taken part by part from Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from kv_models import tiny, twin

from memlayer import KVSession
from memlayer.kernels import cpu_decode, dispatch
from memlayer.kvretrieval import layer_memory
from memlayer.kvretrieval.rope import Rotary
from memlayer.kvretrieval.selectors import InfLLMSelector

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="no C compiler")

SMALL = dict(n_init=2, n_local=8, block_size=4, topk=3, chunk_size=8)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _decoded_logits(session: KVSession, fed: list[int], steps: int) -> list[torch.Tensor]:
    """Logits of `steps` one-token forwards after feeding `fed` (tokens from the logits)."""
    logits = session._forward(fed)
    out = []
    for _ in range(steps):
        logits = session._forward([int(logits.argmax())], phase="decode")
        out.append(logits)
    return out


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each layer step's answer from `decode_layer`: True where the one call took it."""
    calls: list[bool] = []
    real = layer_memory.decode_layer

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor | None:
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(layer_memory, "decode_layer", counted)
    return calls


@pytest.mark.parametrize("page_dtype", ["model", "bfloat16"])
@pytest.mark.parametrize("positions", ["infllm", "exact"])
@pytest.mark.parametrize(
    ("family", "selector"),
    [("llama", "infllm"), ("llama", "quest"), ("qwen3", "rekv"), ("llama-yarn", "quest")],
)
def test_a_decode_step_in_one_call_equals_the_step_part_by_part(
    family: str, selector: str, positions: str, page_dtype: str, fused_calls: list[bool]
) -> None:
    model = tiny(family)
    options = dict(SMALL, selector=selector, positions=positions, page_dtype=page_dtype)
    fused = KVSession(twin(model), None, progress=False, **options)
    apart = KVSession(twin(model), None, progress=False, **options)
    for memory in apart.cache.memories:
        memory.fused_selection = None
    fed = _ids(70, seed=1)
    expected = _decoded_logits(apart, fed, 12)
    assert not fused_calls
    got = _decoded_logits(fused, fed, 12)
    assert fused_calls and all(fused_calls)  # every decode step of every layer, in one call
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_a_selector_that_overrides_select_is_asked_at_every_step(
    fused_calls: list[bool],
) -> None:
    """A subclass's own `select` is never bypassed by the one-call step."""

    @dataclass
    class Newest(InfLLMSelector):
        asked: int = 0

        def select(
            self, queries: torch.Tensor, summaries: torch.Tensor, topk: int, *, scale: float
        ) -> torch.Tensor:
            self.asked += 1
            count = summaries.shape[0]
            pages = torch.arange(max(count - topk, 0), count).view(1, 1, -1)
            return pages.expand(1, summaries.shape[1], -1)

    selector = Newest()
    assert selector.decode_selection is None
    session = KVSession(tiny("llama"), None, progress=False, selector=selector, **SMALL)
    _decoded_logits(session, _ids(70, seed=2), 4)
    assert not fused_calls
    # each layer has its own copy of the selector
    assert all(memory.selector.asked >= 4 for memory in session.cache.memories)


@pytest.mark.parametrize("tokens", [1, 3])
def test_window_put_writes_what_torch_writes(tokens: int) -> None:
    """Raw keys, keys rotated at their positions (YaRN's scaled tables) and values, bit for
    bit, at an offset into the buffers; nothing else in the buffers moves."""
    rotary = Rotary(tiny("llama-yarn").model.rotary_emb, 16, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(2, tokens, 16, generator=generator) for _ in range(2))
    buffers = tuple(torch.randn(2, 40, 16, generator=generator) for _ in range(3))
    before = [b.clone() for b in buffers]
    first, at = 137, 21
    assert dispatch.window_put(keys, values, rotary.tables(first + tokens, torch.float32), first,
                               buffers, at)  # fmt: skip
    raw, rot, val = buffers
    span = slice(at, at + tokens)
    assert torch.equal(raw[:, span], keys) and torch.equal(val[:, span], values)
    assert torch.equal(rot[:, span], rotary.rotate(keys, first))
    for buffer, old in zip(buffers, before, strict=True):
        buffer[:, span] = old[:, span]
        assert torch.equal(buffer, old)


def test_window_put_leaves_a_prefill_chunk_and_the_forced_reference_to_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rotary = Rotary(tiny("llama").model.rotary_emb, 16, torch.device("cpu"), torch.float32)
    buffers = tuple(torch.zeros(2, 64, 16) for _ in range(3))
    tables = rotary.tables(64, torch.float32)
    chunk = torch.randn(2, 16, 16)
    assert not dispatch.window_put(chunk, chunk, tables, 0, buffers, 0)
    monkeypatch.setenv("MEMLAYER_KERNELS", "reference")
    token = torch.randn(2, 1, 16)
    assert not dispatch.window_put(token, token, tables, 0, buffers, 0)
    assert all(not b.any() for b in buffers)
