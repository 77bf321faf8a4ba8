"""SmolLM2 finds a passkey in ~4K tokens through paged memory, where dense attention fails."""

from __future__ import annotations

import pytest
import torch

from memlayer import KVSession
from memlayer.kvretrieval.model import load_smollm2
from memlayer.kvretrieval.passkey import is_correct, samples

pytestmark = pytest.mark.slow


def test_passkey_at_4k_beats_dense() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    dense, _ = load_smollm2()
    cases = samples(4000, 5, seed=1)
    ours = dense_ok = 0
    for case in cases:
        session = KVSession(model, tokenizer, chat=False, progress=False, n_local=512, topk=8)
        session.feed(case.context)
        ours += is_correct(session.ask(case.question, max_new_tokens=8), case)
        prompt = tokenizer(case.context + "\n" + case.question, return_tensors="pt")["input_ids"]
        assert prompt.shape[1] > 4000
        with torch.no_grad():
            out = dense.generate(prompt, max_new_tokens=8, do_sample=False)
        dense_ok += is_correct(tokenizer.decode(out[0, prompt.shape[1] :]), case)
    print(f"passkey ~4K, 5 samples: memlayer infllm {ours}/5, dense {dense_ok}/5")
    assert ours >= 4
    assert ours > dense_ok
