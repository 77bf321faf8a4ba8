"""The model stays the user's: a KVSession routes attention only during its own forwards.

Before, during the life of, and after a session, the same model object generates exactly
what an untouched copy does; two sessions on one model work one after the other and
interleaved, each giving what a session on a model of its own gives.
"""

from __future__ import annotations

import pytest
import torch
from kv_models import tiny, twin

from memlayer import KVSession, UnsupportedModelError

SMALL = dict(n_init=2, n_local=8, block_size=4, topk=2, chunk_size=8)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _generate(model: object, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(  # type: ignore[attr-defined]
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_generate_outside_the_session_matches_an_untouched_copy(implementation: str) -> None:
    shared = tiny("llama")
    shared.set_attn_implementation(implementation)
    untouched = twin(shared)
    prompt = _ids(20, seed=1)
    expected = _generate(untouched, prompt)

    assert _generate(shared, prompt) == expected  # before
    session = KVSession(shared, None, progress=False, **SMALL)
    assert _generate(shared, prompt) == expected  # alive, nothing fed yet
    session.feed(_ids(60, seed=2))
    assert _generate(shared, prompt) == expected  # between forwards
    session.continue_ids(_ids(5, seed=3), 4)
    assert _generate(shared, prompt) == expected  # after a question
    assert shared.config._attn_implementation == implementation
    del session
    assert _generate(shared, prompt) == expected  # after


def test_two_sessions_on_one_model_match_sessions_on_their_own_models() -> None:
    shared = tiny("llama")
    texts = {"infllm": _ids(70, seed=4), "quest": _ids(90, seed=5)}
    question = _ids(5, seed=6)

    def halves(text: list[int]) -> list[list[int]]:  # fed in two parts: the same chunking
        return [text[: len(text) // 2], text[len(text) // 2 :]]

    def answer(session: KVSession, parts: list[list[int]]) -> list[int]:
        for part in parts:
            session.feed(part)
        return session.continue_ids(question, 6)

    expected = {
        name: answer(
            KVSession(twin(shared), None, progress=False, selector=name, **SMALL), halves(text)
        )
        for name, text in texts.items()
    }

    # one after the other
    for name, text in texts.items():
        session = KVSession(shared, None, progress=False, selector=name, **SMALL)
        assert answer(session, halves(text)) == expected[name]

    # interleaved: each session's halves fed in turn, then each asked
    sessions = {
        name: KVSession(shared, None, progress=False, selector=name, **SMALL) for name in texts
    }
    for half in (0, 1):
        for name, session in sessions.items():
            session.feed(halves(texts[name])[half])
    for name, session in sessions.items():
        assert session.continue_ids(question, 6) == expected[name]


def test_the_cache_is_a_transformers_cache_of_memlayer_layers() -> None:
    session = KVSession(tiny("llama"), None, progress=False, **SMALL)
    session.feed(_ids(40, seed=7))
    cache = session.cache
    assert len(cache.layers) == 2 and cache.layers[0] is cache.memories[0]
    assert cache.get_seq_length() == 40 == cache.layers[1].get_seq_length()
    with pytest.raises(UnsupportedModelError, match="no beam search"):
        cache.reorder_cache(torch.tensor([0]))
