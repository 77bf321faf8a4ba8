"""Real MiniLM embedder: semantic recall works; hybrid beats vector-only on keywords."""

from __future__ import annotations

import random

import pytest

from memlayer import Memory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def memory(tmp_path_factory: pytest.TempPathFactory):
    with Memory(path=tmp_path_factory.mktemp("minilm")) as mem:
        yield mem


def test_semantic_recall_with_the_packaged_model(memory: Memory) -> None:
    memory.add_many(
        [
            "The user is allergic to peanuts.",
            "The quarterly report is due on Friday.",
            "Our office moved to the fourth floor.",
            "The cat knocked over the vase.",
        ],
        user_id="sem",
    )
    assert memory.embedder.dim == 384
    top = memory.search("what food must I avoid serving them?", k=1, mode="vector", user_id="sem")
    assert top[0].text == "The user is allergic to peanuts."


def test_hybrid_beats_vector_on_keyword_heavy_queries(memory: Memory) -> None:
    rng = random.Random(11)
    templates = [
        "Support ticket {code}: the customer reports the invoice total looks wrong.",
        "Support ticket {code}: the customer cannot log in after the password reset.",
        "Support ticket {code}: the parcel arrived damaged and a refund was requested.",
        "Support ticket {code}: the customer asks to change the delivery address.",
    ]
    codes = set()
    while len(codes) < 120:
        codes.add(
            f"{rng.choice('BCDFGHJKLMNPQRSTVWXZ')}{rng.choice('AEIOU')}{rng.randint(1000, 9999)}"
        )
    ordered = sorted(codes)
    ids = memory.add_many(
        [rng.choice(templates).format(code=code) for code in ordered], user_id="kw"
    )
    by_code = dict(zip(ordered, ids, strict=True))
    queries = rng.sample(ordered, 40)

    def hits_at_1(mode: str) -> int:
        return sum(
            memory.search(f"what happened with ticket {code}?", k=1, mode=mode, user_id="kw")[0].id
            == by_code[code]
            for code in queries
        )

    vector, hybrid = hits_at_1("vector"), hits_at_1("hybrid")
    print(f"hit@1 on 40 keyword queries: vector {vector}, hybrid {hybrid}")
    assert hybrid > vector
    assert hybrid >= 36  # BM25 finds the exact code; fusion keeps it on top


def test_a_text_longer_than_the_window_is_embedded_whole(memory: Memory) -> None:
    """MiniLM reads 256 tokens; a longer record is embedded window by window, so a fact near
    its end is found, where a silently truncated embedding would never see it."""
    garden = [
        f"In week {i} the gardener watered the tomatoes, pruned the roses and weeded the beds."
        for i in range(30)
    ]
    tail = "The vault combination is written behind the lighthouse painting in the attic."
    long_text = " ".join([*garden, tail])
    tokenizer = memory.embedder._model.tokenizer  # type: ignore[attr-defined]
    assert len(tokenizer(long_text, add_special_tokens=False)["input_ids"]) > 2 * 256
    rid = memory.add(long_text, user_id="long")
    memory.add_many(garden[:10], user_id="long")

    top = memory.search(
        "where is the vault combination written?", k=1, mode="vector", user_id="long"
    )
    assert top[0].id == rid
