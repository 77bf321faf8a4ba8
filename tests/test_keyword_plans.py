"""Keyword search's faster plans rank exactly as the plain ones: SQLite's narrow-scope plan
(the scope's rowids first) and PostgreSQL's document counts from the planner's statistics."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from memlayer import Memory
from memlayer.retrievers.keywords import term_groups
from memlayer.types import Scope

WORDS = ["travel", "seat", "window", "aisle", "visa", "hotel", "cat", "dog", "tea", "東京都"]


def _fill(memory: Memory) -> None:
    rng = random.Random(3)
    for tenant in ("acme", "globex"):
        for user in range(6):
            items = [
                {"text": " ".join(rng.choices(WORDS, k=6)), "metadata": {"n": n % 3}}
                for n in range(30)
            ]
            memory.add_many(items, tenant_id=tenant, user_id=f"u{user}", session_id=f"s{user % 2}")


def test_narrow_scope_plan_ranks_as_the_join(open_memory: Callable[..., Memory]) -> None:
    with open_memory(embedder="hash") as memory:
        _fill(memory)
        keywords = memory._retriever._keywords
        scopes = [
            Scope(tenant_id="acme", user_id="u1"),
            Scope(tenant_id="globex", user_id="u2", session_id="s0"),
            Scope(tenant_id="acme", session_id="s1"),
        ]
        for scope in scopes:
            for filters in (None, {"n": 1}):
                condition = memory._records.condition(scope, filters)
                for query in ("cat window", "東京 tea", "hotel"):
                    narrow = keywords.search(query, 1000, condition, True)
                    joined = keywords.search(query, 1000, condition, False)
                    assert narrow, (scope, filters, query)
                    assert sorted(narrow) == sorted(joined), (scope, filters, query)
                    top = [score for _, score in keywords.search(query, 5, condition, True)]
                    assert top == [score for _, score in joined[:5]]
        hits = memory.search("cat", k=50, mode="keyword", tenant_id="acme", user_id="u1")
        assert hits and all(h.scope.user_id == "u1" and h.scope.tenant_id == "acme" for h in hits)


def test_postgres_document_counts_from_statistics(open_memory: Callable[..., Memory]) -> None:
    with open_memory(embedder="hash") as memory:
        if memory._records.dialect != "postgresql":
            pytest.skip("PostgreSQL's keyword index only")
        _fill(memory)
        keywords = memory._retriever._keywords
        vector: Any = func.to_tsvector("simple", memory._records.records.c.keywords)
        groups = sorted(
            {" ".join(g) for w in ("cat", "visa", "東京都", "zebra") for g in term_groups(w)}
        )
        queries = [func.phraseto_tsquery("simple", g) for g in groups]
        matches = [vector.op("@@")(q) for q in queries]
        scope = Scope(tenant_id="acme", user_id="u1")
        condition = memory._records.condition(scope)
        with memory._records.engine.connect() as conn:
            before = keywords._idf(conn, groups, matches)  # no statistics yet: counted
            ranked = keywords.search("cat 東京都", 20, condition, True)
        with memory._records.write() as conn:
            conn.exec_driver_sql("ANALYZE records")
        with memory._records.engine.connect() as conn:
            total, shares = keywords._statistics(conn, groups)
            after = keywords._idf(conn, groups, matches)
            table = memory._records.records
            exact = [
                conn.execute(select(func.count()).select_from(table).where(m)).scalar_one()
                for m in matches
            ]
        assert total == 360
        common = dict(zip(groups, shares, strict=True))
        assert common["cat"] is not None and common["zebra"] is None  # zebra: not stored
        assert common["東京 京都"] is None  # two terms, a phrase: counted, never estimated
        assert after == pytest.approx(before, rel=0.02)
        for share, n in zip(shares, exact, strict=True):
            assert share is None or abs(share * total - n) <= 1
        again = keywords.search("cat 東京都", 20, condition, True)
        assert [score for _, score in again] == pytest.approx([s for _, s in ranked], rel=0.02)
