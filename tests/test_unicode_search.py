"""Keyword and hybrid search find words in scripts without spaces and in accented Latin text."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from backends import BACKENDS, location

from memlayer import Memory
from memlayer.retrievers.keywords import index_text, match_query

TEXTS = {
    "zh": "我们明天去北京参观故宫博物院",
    "ja": "東京タワーに行った",
    "ko": "서울에 갔다가 부산으로 내려왔다",
    "th": "ภาษาไทยง่ายมาก",
    "fr": "Le café crème de la brûlerie était délicieux",
    "de": "Die Straße führt über die Brücke",
    "en": "The harbour opens at dawn",
}

QUERIES = [
    ("zh", "北京"),
    ("zh", "故宫"),
    ("ja", "東京"),
    ("ja", "タワー"),
    ("ko", "서울"),
    ("ko", "부산"),
    ("th", "ภาษาไทย"),
    ("th", "ง่าย"),
    ("fr", "café"),
    ("fr", "cafe"),  # unaccented query finds accented text
    ("fr", "BRÛLERIE"),
    ("de", "Brücke"),
    ("de", "brucke"),
    ("en", "harbour"),
]


@pytest.fixture(scope="module", params=BACKENDS)
def memory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    where = location(request.param, request, tmp_path_factory.mktemp("unicode"))
    with Memory(**where, embedder="hash") as mem:
        for rid, text in TEXTS.items():
            mem.add(text, id=rid)
        yield mem


@pytest.mark.parametrize(("expected", "query"), QUERIES)
def test_keyword_search_finds_the_word(memory: Memory, expected: str, query: str) -> None:
    assert [hit.id for hit in memory.search(query, k=3, mode="keyword")] == [expected]


@pytest.mark.parametrize(("expected", "query"), QUERIES)
def test_hybrid_search_ranks_the_word_first(memory: Memory, expected: str, query: str) -> None:
    assert memory.search(query, k=3, mode="hybrid")[0].id == expected


def test_a_cjk_word_matches_where_it_occurs_not_its_characters_apart(memory: Memory) -> None:
    """京 and 北 both occur in the Chinese text, but not as 京北: bigrams are a phrase."""
    assert memory.search("京北", k=3, mode="keyword") == []
    assert memory.search("タワー東京", k=3, mode="keyword") == []


def test_terms() -> None:
    assert index_text("Café, CRÈME!") == "cafe creme"
    assert index_text("東京タワー") == "東京 京タ タワ ワー"
    assert index_text("iPhone機種") == "iphone 機種"
    assert index_text("x") == "x" and index_text("東") == "東"
    assert match_query("東京 cafe") == '"cafe" OR "東京"'
    assert match_query("?!") is None


def test_keywords_follow_updates(open_memory: Callable[..., Memory]) -> None:
    with open_memory(embedder="hash") as mem:
        rid = mem.add("大阪城に行った")
        mem.update(rid, text="名古屋城に行った")
        assert mem.search("大阪", mode="keyword") == []
        assert [h.id for h in mem.search("名古屋", mode="keyword")] == [rid]
