"""Clustered context (`Memory.context(strategy="crag")`) as a user relies on it: the budget is
never exceeded, every cluster speaks when the budget allows, each part names the memories it
came from, the same store and query give the same context, and bad input is refused."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from memlayer import AsyncMemory, InvalidInputError, Memory
from memlayer.chunking import count_tokens, split_sentences
from memlayer.context import Candidates, Context, CragContext
from memlayer.types import Hit, Scope

# Five topics with disjoint vocabularies: the hash embedder puts them far apart, so they are
# the clusters CRAG must find (the test is about packing, not about semantics).
TOPICS = {
    "battery": ["battery", "charge", "hours", "lasts", "power"],
    "delivery": ["parcel", "courier", "shipping", "arrived", "box"],
    "screen": ["screen", "bright", "pixels", "display", "glare"],
    "price": ["price", "dollars", "expensive", "cheap", "paid"],
    "sound": ["speaker", "bass", "loud", "audio", "treble"],
}


def _sentence(rng: random.Random, topic: str) -> str:
    words = rng.sample(TOPICS[topic], 4)
    return f"{words[0].capitalize()} {' '.join(words[1:])} {topic}."


def _items(n: int = 150, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    names = list(TOPICS)
    items = []
    for i in range(n):
        topic = names[i % len(names)]
        text = " ".join(_sentence(rng, topic) for _ in range(rng.choice([1, 2])))
        items.append({"text": text, "id": f"m{i}", "metadata": {"topic": topic}})
    return items


QUERY = "battery charge parcel screen price speaker"


@pytest.fixture
def memory(open_memory: Callable[..., Memory]):
    """The corpus in a Memory on each backend (SQLite, PostgreSQL with pgvector)."""
    with open_memory(embedder="hash") as mem:
        mem.add_many(_items())
        yield mem


def _sentences_of(context: Context) -> list[str]:
    return [s for part in context.parts for s in split_sentences(part.text)]


@pytest.mark.parametrize("budget", [6, 9, 13, 20, 33, 50, 80, 130, 250, 1000])
def test_budget_is_never_exceeded(memory: Memory, budget: int) -> None:
    context = memory.context(QUERY, budget_tokens=budget, strategy="crag")
    assert 0 < context.tokens <= budget
    assert context.tokens == count_tokens(context.text)


def test_budget_holds_in_the_tokens_of_a_named_tokenizer(memory: Memory) -> None:
    def chars(text: str) -> int:  # a tokenizer that splits finer than words
        return len(text) // 3

    for budget in (20, 60, 200):
        context = memory.context(QUERY, budget_tokens=budget, strategy="crag", tokenizer=chars)
        assert 0 < context.tokens <= budget
        assert context.tokens == chars(context.text)
        ranked = memory.context(QUERY, budget_tokens=budget, tokenizer=chars)
        assert 0 < ranked.tokens <= budget


def test_every_cluster_is_represented_when_the_budget_allows(memory: Memory) -> None:
    context = memory.context(QUERY, budget_tokens=200, k=150, strategy="crag")  # every item
    topics = {memory.get(rid).metadata["topic"] for part in context.parts for rid in part.ids}
    assert topics == set(TOPICS)
    # and each part speaks for one cluster: its memories share a topic
    for part in context.parts:
        assert len({memory.get(rid).metadata["topic"] for rid in part.ids}) == 1


def test_a_tight_budget_keeps_the_most_relevant_clusters(memory: Memory) -> None:
    context = memory.context("battery charge hours power", budget_tokens=7, strategy="crag")
    assert [memory.get(rid).metadata["topic"] for rid in context.ids] == ["battery"]


def test_parts_trace_back_to_the_memories_they_quote(memory: Memory) -> None:
    context = memory.context(QUERY, budget_tokens=120, strategy="crag")
    assert context.parts
    assert context.ids == list(dict.fromkeys(rid for part in context.parts for rid in part.ids))
    for part in context.parts:
        sources = [memory.get(rid) for rid in part.ids]
        assert all(source is not None for source in sources)
        for sentence in split_sentences(part.text):
            assert any(sentence in split_sentences(s.text) for s in sources), sentence
        for source in sources:  # every id named is quoted
            assert any(s in split_sentences(part.text) for s in split_sentences(source.text))


def test_sentences_are_not_repeated(memory: Memory) -> None:
    sentences = _sentences_of(memory.context(QUERY, budget_tokens=400, strategy="crag"))
    assert len(sentences) == len({" ".join(s.casefold().split()) for s in sentences})


def test_same_store_and_query_give_the_same_context(tmp_path: Path) -> None:
    folder = tmp_path / "mem"
    with Memory(path=folder, embedder="hash") as mem:
        mem.add_many(_items())
        first = mem.context(QUERY, budget_tokens=90, strategy="crag")
        again = mem.context(QUERY, budget_tokens=90, strategy="crag")
        fresh = mem.context(QUERY, budget_tokens=90, strategy=CragContext())
    with Memory(path=folder, embedder="hash") as reopened:
        later = reopened.context(QUERY, budget_tokens=90, strategy="crag")
    assert first == again == fresh == later


def test_scope_and_filters_bound_the_candidates(memory: Memory) -> None:
    memory.add("Battery charge lasts hours power battery.", id="other", user_id="bob")
    context = memory.context(
        QUERY, budget_tokens=300, strategy="crag", filters={"topic": {"$in": ["price", "sound"]}}
    )
    assert {memory.get(rid).metadata["topic"] for rid in context.ids} == {"price", "sound"}
    mine = memory.context(QUERY, budget_tokens=300, strategy="crag", user_id="bob")
    assert mine.ids == ["other"]


def test_an_empty_scope_gives_an_empty_context(memory: Memory) -> None:
    context = memory.context(QUERY, budget_tokens=50, strategy="crag", user_id="nobody")
    assert (context.text, context.ids, context.tokens, context.parts) == ("", [], 0, [])


class _Recall:
    """A Recall over fixed candidates (ranked in row order) that records how many each call
    asked for."""

    def __init__(
        self, vectors: np.ndarray, query: np.ndarray, texts: list[str] | None = None
    ) -> None:
        self.query, self.k, self.embedder, self.tokenizer = "q", 5, "test", count_tokens
        self.asked: list[int] = []
        self._vectors, self._query = vectors, query
        self._texts = texts or [f"Sentence {i}." for i in range(len(vectors))]

    def hits(self, n: int) -> list[Hit]:
        return self.candidates(n).hits

    def candidates(self, n: int) -> Candidates:
        self.asked.append(n)
        rows = self._vectors[:n]
        hits = [Hit(f"h{i}", self._texts[i], 1.0, {}, Scope(), 0.0, 0.0) for i in range(len(rows))]
        return Candidates(hits, rows, self._query)

    def embed(self, texts: list[str]) -> np.ndarray:
        raise AssertionError("single-sentence candidates need no embedding")


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def test_flat_scores_widen_the_candidate_set() -> None:
    rng = np.random.default_rng(0)
    query = _unit(rng.standard_normal(16))
    flat = _unit(query + 0.01 * rng.standard_normal((1000, 16)))
    recall = _Recall(flat, query)
    CragContext(min_candidates=50, max_candidates=300).pack(recall, 40)
    assert recall.asked == [50, 100, 200, 300]

    steep = np.concatenate([flat[:10], _unit(rng.standard_normal((990, 16)))])
    recall = _Recall(steep, query)
    CragContext(min_candidates=50, max_candidates=300).pack(recall, 40)
    assert recall.asked == [50]


def _repetitive_head(total: int = 200) -> _Recall:
    """Ranked candidates whose best 50 say five things, each ten times over, at clearly
    falling query similarity (not flat), and whose next ones each say something new."""
    rng = np.random.default_rng(1)
    query = _unit(rng.standard_normal(16))

    def at(cosine: float) -> np.ndarray:  # a unit vector at this cosine to the query
        other = rng.standard_normal(16)
        other = _unit(other - (other @ query) * query)
        return _unit(cosine * query + np.sqrt(1 - cosine**2) * other)

    topics = [
        "Battery lasts ten hours.",
        "Delivery took four days.",
        "The strap is green.",
        "Setup needs the app.",
        "The case feels solid.",
    ]
    head = [(at(c), t) for c, t in zip([0.9, 0.7, 0.5, 0.3, 0.1], topics, strict=True)]
    rows = [v for v, _ in head for _ in range(10)] + [at(0.05) for _ in range(total - 50)]
    texts = [t for _, t in head for _ in range(10)]
    texts += [f"Tail note number {i} says more." for i in range(50, total)]
    return _Recall(np.stack(rows).astype(np.float32), query, texts)


def test_candidates_widen_while_packing_runs_dry() -> None:
    recall = _repetitive_head()
    context = CragContext(min_candidates=50).pack(recall, 60)
    # the best 50 hold five distinct sentences (about 25 tokens): the budget is not filled,
    # so the next 50 are fetched, and what they add is in the context
    assert recall.asked == [50, 100]
    assert "Tail note number" in context.text
    assert context.tokens > 40
    assert all(int(rid[1:]) < 100 for rid in context.ids)

    recall = _repetitive_head()
    off = CragContext(min_candidates=50, widen_to_fill=False).pack(recall, 60)
    assert recall.asked == [50]
    assert "Tail note number" not in off.text and off.tokens < 40


def test_candidates_do_not_widen_once_the_budget_is_filled() -> None:
    recall = _repetitive_head()
    CragContext(min_candidates=50).pack(recall, 12)  # two of the five sentences fill it
    assert recall.asked == [50]


def test_widening_stops_when_it_adds_nothing() -> None:
    recall = _repetitive_head()
    head = recall._vectors[:50]
    # further down, the same five sentences again: widening once finds nothing new
    again = _Recall(np.concatenate([head, head, head, head]), recall._query, recall._texts[:50] * 4)
    context = CragContext(min_candidates=50).pack(again, 60)
    assert again.asked == [50, 100]
    assert context == CragContext(min_candidates=50, widen_to_fill=False).pack(again, 60)


def test_widening_stops_at_max_candidates_and_at_the_end_of_the_ranking() -> None:
    recall = _repetitive_head()
    CragContext(min_candidates=50, max_candidates=70).pack(recall, 1000)
    assert recall.asked == [50, 70]
    recall = _repetitive_head(total=90)  # fewer than asked for: nothing further down
    CragContext(min_candidates=50).pack(recall, 1000)
    assert recall.asked == [50, 100]


def test_abstractive_contexts_do_not_widen_to_fill() -> None:
    recall = _repetitive_head()
    CragContext(min_candidates=50, summarizer=lambda texts, n: texts[0]).pack(recall, 200)
    assert recall.asked == [50]


def test_abstractive_summaries_are_cached_by_cluster_content(memory: Memory) -> None:
    calls: list[tuple[list[str], int]] = []

    def summarize(texts: list[str], max_tokens: int) -> str:
        calls.append((texts, max_tokens))
        return f"{len(texts)} notes about {texts[0].split()[-1]} " + "and more " * 50

    crag = CragContext(summarizer=summarize)
    context = memory.context(QUERY, budget_tokens=100, k=150, strategy=crag)
    assert calls and len(calls) == len(context.parts)
    assert context.tokens <= 100
    for (texts, allowance), part in zip(calls, context.parts, strict=True):
        assert count_tokens(part.text) <= allowance  # a long answer is cut to its allowance
        assert [memory.get(rid).text for rid in part.ids] == texts
    made = len(calls)
    assert memory.context(QUERY, budget_tokens=100, k=150, strategy=crag) == context
    other = " ".join(reversed(QUERY.split()))  # another query, the same candidates
    assert memory.context(other, budget_tokens=100, k=150, strategy=crag).text
    assert len(calls) == made  # the same clusters: no new summaries


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda m: m.context(QUERY, budget_tokens=2, strategy="crag"), "budget_tokens"),
        (lambda m: m.context(QUERY, budget_tokens=0, strategy="crag"), "budget_tokens"),
        (lambda m: m.context(QUERY, budget_tokens=50, strategy="clustered"), "strategy"),
        (lambda m: m.context(QUERY, budget_tokens=50, strategy=42), "strategy"),
        (lambda m: m.context(QUERY, budget_tokens=50, strategy="crag", k=0), "k"),
        (lambda m: m.context("", budget_tokens=50, strategy="crag"), "query"),
        (lambda m: m.context(QUERY, budget_tokens=50, strategy="crag", tokenizer=3), "tokenizer"),
        (
            lambda m: m.context(QUERY, budget_tokens=50, strategy="crag", tokenizer=lambda t: -1),
            "tokenizer",
        ),
        (
            lambda m: m.context(
                QUERY, budget_tokens=50, strategy=CragContext(summarizer=lambda t, n: None)
            ),
            "summarizer",
        ),
        (
            lambda m: m.context(
                QUERY, budget_tokens=50, strategy=CragContext(summarizer=lambda t, n: "  ")
            ),
            "summarizer",
        ),
        (
            lambda m: m.context(
                QUERY, budget_tokens=50, strategy=CragContext(summarizer=lambda t, n: 7)
            ),
            "summarizer",
        ),
        (lambda m: CragContext(summarizer="llm"), "summarizer"),
        (lambda m: CragContext(min_candidates=0), "min_candidates"),
        (lambda m: CragContext(min_candidates=60, max_candidates=50), "max_candidates"),
        (lambda m: CragContext(widen_to_fill="yes"), "widen_to_fill"),
        (lambda m: CragContext(novelty=float("nan")), "novelty"),
        (lambda m: CragContext(flat_spread="0.3"), "flat_spread"),
    ],
)
def test_bad_input_names_the_field_and_changes_nothing(memory: Memory, call, field: str) -> None:
    before = memory.count()
    with pytest.raises(InvalidInputError) as info:
        call(memory)
    assert info.value.field == field
    assert str(info.value).startswith(field)
    assert memory.count() == before


def test_budget_below_one_sentence_says_what_one_sentence_takes(memory: Memory) -> None:
    with pytest.raises(InvalidInputError, match="at least one sentence"):
        memory.context(QUERY, budget_tokens=2, strategy="crag")


def test_a_bad_summary_is_not_cached() -> None:
    answers = [None]  # the first answer is bad, every later one fine

    def summarize(texts: list[str], max_tokens: int) -> str | None:
        return answers.pop() if answers else "A fine summary of the cluster."

    crag = CragContext(summarizer=summarize)
    with Memory(embedder="hash", url="sqlite://") as mem:
        mem.add_many(_items(20))
        with pytest.raises(InvalidInputError):
            mem.context(QUERY, budget_tokens=50, strategy=crag)
        assert "fine summary" in mem.context(QUERY, budget_tokens=50, strategy=crag).text


def test_async_memory_packs_crag_too(tmp_path: Path) -> None:
    async def main() -> tuple[Context, Context]:
        async with AsyncMemory(path=tmp_path / "a", embedder="hash") as mem:
            await mem.add_many(_items(60))
            crag = await mem.context(QUERY, budget_tokens=60, strategy="crag")
            return crag, mem.sync.context(QUERY, budget_tokens=60, strategy="crag")

    awaited, direct = asyncio.run(main())
    assert awaited == direct and awaited.tokens <= 60


@pytest.mark.slow
def test_minilm_budgets_count_minilm_tokens(tmp_path: Path) -> None:
    with Memory(path=tmp_path / "m") as mem:
        mem.add_many(_items(80))
        context = mem.context(QUERY, budget_tokens=60, strategy="crag")
        assert 0 < context.tokens <= 60
        assert context.tokens == mem.embedder.count_tokens(context.text)  # type: ignore[attr-defined]
        ranked = mem.context(QUERY, budget_tokens=60)
        assert 0 < ranked.tokens == mem.embedder.count_tokens(ranked.text) <= 60  # type: ignore[attr-defined]
