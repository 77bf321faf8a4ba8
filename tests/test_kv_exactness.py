"""Paged KV memory equals dense attention when every page is selected at its true position.

This keeps every selector honest: the split into sinks, pages and local window, the
log-sum-exp merge, the rotary handling and the chunking must add up to the dense model.
"""

from __future__ import annotations

import sys

import pytest
import torch
from kv_models import EXACT, tiny, twin

from memlayer import KVSession

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "llama-yarn"]


@pytest.mark.parametrize("selector", ["infllm", "quest"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_generation_equal_dense(family: str, selector: str) -> None:
    dense = tiny(family)
    ids = torch.randint(0, 96, (1, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = dense(ids).logits[0]
        continuation = dense.generate(ids, max_new_tokens=8, do_sample=False)[0, 90:].tolist()

    session = KVSession(twin(dense), None, progress=False, selector=selector, **EXACT)
    logits = session._forward(ids[0].tolist(), all_logits=True)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert session.stats()["pages"] > 0  # the memory really was paged

    session = KVSession(twin(dense), None, progress=False, selector=selector, **EXACT)
    session.feed(ids[0].tolist())
    assert session.continue_ids([], 8) == continuation


def test_bounded_span_differs_from_dense_but_stays_finite() -> None:
    dense = tiny("llama")
    ids = torch.randint(0, 96, (1, 120), generator=torch.Generator().manual_seed(4))
    session = KVSession(
        twin(dense), None, progress=False, n_init=2, n_local=8, block_size=4, topk=2, chunk_size=8
    )
    logits = session._forward(ids[0].tolist(), all_logits=True)
    assert torch.isfinite(logits).all()
    stats = session.stats()
    assert stats["pages"] == 2 * ((120 - 2 - 8) // 4)
    assert stats["attention_span"] == 2 + 2 * 4 + 8 + 4


@pytest.mark.parametrize("family", ["llama", "qwen3", "llama-yarn"])
def test_a_session_skips_the_models_rotation_only_where_it_is_the_identity(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session's forwards run every position at 0, where plain RoPE rotates by the
    identity: the model's own rotation is skipped there. YaRN's multiplies by its scaling,
    so it runs. A dense forward of the same model, between the session's, still rotates and
    equals a twin that never met memlayer."""
    model, untouched = tiny(family), tiny(family)
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    calls = 0
    rotate_half = module.rotate_half

    def counted(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return rotate_half(x)

    monkeypatch.setattr(module, "rotate_half", counted)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(5))
    session = KVSession(model, None, progress=False, **EXACT)
    session.feed(ids[0].tolist())
    assert (calls > 0) == (family == "llama-yarn")
    calls = 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, untouched(ids).logits)
    assert calls > 0
