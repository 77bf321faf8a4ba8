"""Paged KV memory equals dense attention when every page is selected at its true position.

This keeps every selector honest: the split into sinks, pages and local window, the
log-sum-exp merge, the rotary handling and the chunking must add up to the dense model.
"""

from __future__ import annotations

import pytest
import torch
from kv_models import tiny, twin

from memlayer import KVSession

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "llama-yarn"]
EXACT = dict(n_init=3, n_local=8, block_size=4, topk=1000, chunk_size=8, positions="exact")


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
