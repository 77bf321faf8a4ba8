"""Input limits and bad vectors: refused with InvalidInputError naming the field and the cap,
and nothing stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memlayer import InvalidInputError, Limits, Memory


@pytest.fixture
def memory(tmp_path: Path):
    limits = Limits(max_text_chars=1_000, max_metadata_bytes=200, max_metadata_depth=3, max_batch=5)
    with Memory(path=tmp_path / "m", embedder="hash", limits=limits) as mem:
        mem.add("an existing record")
        yield mem


def _nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"child": value}
    return value


@pytest.mark.parametrize(
    ("call", "field", "cap"),
    [
        (lambda m: m.add("x" * 1_001), "text", "Limits.max_text_chars"),
        (lambda m: m.search("q" * 1_001), "query", "Limits.max_text_chars"),
        (lambda m: m.add("x", metadata={"blob": "y" * 300}), "metadata", "max_metadata_bytes"),
        (lambda m: m.add("x", metadata=_nested(4)), "metadata", "max_metadata_depth"),
        (lambda m: m.add("x", metadata={"a": [[[1]]]}), "metadata", "max_metadata_depth"),
        (lambda m: m.add_many(["t"] * 6), "items", "Limits.max_batch"),
        (
            lambda m: m.add_many(["ok", {"text": "y" * 1_001}]),
            "items[1].text",
            "Limits.max_text_chars",
        ),
        (
            lambda m: m.update(m.search("existing")[0].id, text="z" * 1_001),
            "text",
            "Limits.max_text_chars",
        ),
        (
            lambda m: m.add_many([{"text": "a", "id": "d"}, {"text": "b", "id": "d"}]),
            "items",
            "repeat",
        ),
    ],
)
def test_caps_name_the_field_and_the_limit(memory: Memory, call, field: str, cap: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        call(memory)
    assert info.value.field == field
    assert cap in str(info.value)
    assert memory.count() == 1
    assert memory.search("existing", k=5)[0].text == "an existing record"


def test_defaults_accept_ordinary_input_and_refuse_a_20_mb_value(tmp_path: Path) -> None:
    with Memory(path=tmp_path / "m", embedder="hash") as mem:
        mem.add("x" * 50_000, metadata=_nested(10))
        mem.add_many(["short note"] * 500)
        with pytest.raises(InvalidInputError, match="max_metadata_bytes"):
            mem.add("big", metadata={"blob": "y" * 20_000_000})
        assert mem.count() == 501


def test_limits_themselves_are_validated() -> None:
    with pytest.raises(InvalidInputError) as info:
        Limits(max_batch=0)
    assert info.value.field == "max_batch"


@pytest.mark.parametrize(
    ("bad", "rule"),
    [(np.nan, "finite"), (np.inf, "finite"), (-np.inf, "finite"), (0.0, "all-zero")],
)
def test_bad_embeddings_are_refused_and_store_nothing(
    tmp_path: Path, bad: float, rule: str
) -> None:
    def embedder(texts: list[str]) -> np.ndarray:
        out = np.ones((len(texts), 8), dtype=np.float32)
        for row, text in enumerate(texts):
            if "poison" in text:
                out[row] = 0.0
                out[row, 0] = bad
        return out

    with Memory(path=tmp_path / "m", embedder=embedder) as mem:
        mem.add("fine")
        with pytest.raises(InvalidInputError) as info:
            mem.add_many(["also fine", "poison pill"])
        assert info.value.field == "embedder" and rule in str(info.value)
        assert "text 1" in str(info.value)
        with pytest.raises(InvalidInputError):
            mem.search("poison")
        assert mem.count() == 1 and mem.stats()["vectors"] == 1


def test_a_legacy_all_zero_embedding_is_left_out_of_vector_search(tmp_path: Path) -> None:
    """0.1.0 stored an all-zero vector for a text its callable embedder could not place; the
    index (which refuses such vectors) must still rebuild and catch up around it."""
    import sqlite3

    folder = tmp_path / "m"
    with Memory(path=folder, embedder="hash") as mem:
        mem.add("ordinary travel note", id="ok")
        mem.add("a note whose vector was lost", id="zero")
    with sqlite3.connect(folder / "memory.db") as db:
        db.execute("UPDATE records SET embedding = ? WHERE id = 'zero'", (bytes(4 * 64),))
    (folder / "vectors.idx").unlink()
    with Memory(path=folder, embedder="hash") as mem:
        assert mem.stats()["vectors"] == 1 and mem.stats()["records"] == 2
        assert [h.id for h in mem.search("note", k=5, mode="vector")] == ["ok"]
        assert [h.id for h in mem.search("vector was lost", k=5, mode="keyword")] == ["zero"]
        assert mem.get("zero").text == "a note whose vector was lost"
