"""Metadata filters: SQL selection equals the Python reference on random data and filters."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from backends import BACKENDS, location
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memlayer import InvalidInputError, Memory
from memlayer.stores.filters import matches, validate

KEYS = ["color", "size", "flag", "nested.depth"]
SCALARS = st.one_of(
    st.sampled_from(["red", "green", "blue", ""]),
    st.integers(-5, 5),
    st.floats(-5, 5, allow_nan=False).map(lambda x: round(x, 2)),
    st.booleans(),
)


def _condition() -> st.SearchStrategy[Any]:
    ordered = st.one_of(st.integers(-5, 5), st.sampled_from(["blue", "green", "red"]))
    return st.one_of(
        SCALARS,
        st.builds(lambda v: {"$eq": v}, SCALARS),
        st.builds(lambda v: {"$ne": v}, SCALARS),
        st.builds(lambda v: {"$in": v}, st.lists(SCALARS, max_size=3)),
        st.builds(lambda v: {"$nin": v}, st.lists(SCALARS, max_size=3)),
        st.builds(lambda op, v: {op: v}, st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), ordered),
        st.builds(lambda v: {"$exists": v}, st.booleans()),
    )


FIELD_FILTER = st.builds(lambda key, cond: {key: cond}, st.sampled_from(KEYS), _condition())
FILTERS = st.recursive(
    FIELD_FILTER,
    lambda inner: st.one_of(
        st.builds(lambda xs: {"$and": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda xs: {"$or": xs}, st.lists(inner, min_size=1, max_size=3)),
    ),
    max_leaves=5,
)


def _random_rows(count: int, seed: int = 3) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    # arrays and objects too: on PostgreSQL equality is jsonb containment, under which an
    # array holds a scalar at the top level
    values = ["red", "green", "blue", "", -2, 0, 3, 3.0, 1.5, True, False]
    values += [[3, "red"], ["blue"], [True], {"depth": 3}]
    rows = []
    for _ in range(count):
        row = {key: rng.choice(values) for key in ("color", "size", "flag") if rng.random() < 0.7}
        if rng.random() < 0.6:
            row["nested"] = {"depth": rng.choice(values)}
        elif rng.random() < 0.3:
            row["nested"] = [{"depth": rng.choice(values)}]
        rows.append(row)
    return rows


@pytest.fixture(scope="module", params=BACKENDS)
def populated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    rows = _random_rows(80)
    where = location(request.param, request, tmp_path_factory.mktemp("filters"))
    with Memory(**where, embedder="hash") as mem:
        ids = mem.add_many([{"text": f"record {i}", "metadata": m} for i, m in enumerate(rows)])
        yield mem, dict(zip(ids, rows, strict=True))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(filters=FILTERS)
def test_sql_filtering_equals_the_python_reference(populated, filters) -> None:
    mem, rows = populated
    expected = {rid for rid, meta in rows.items() if matches(filters, meta)}
    assert mem.count(filters=filters) == len(expected)
    hits = mem.search("record", k=len(rows), mode="vector", filters=filters)
    assert {hit.id for hit in hits} == expected


def test_semantics_by_example() -> None:
    meta = {"color": "red", "size": 3, "flag": True, "nested": {"depth": 2}}
    assert matches({"color": "red", "nested.depth": {"$gte": 2}}, meta)
    assert not matches({"flag": 1}, meta)  # a boolean never equals a number
    assert matches({"missing": {"$ne": "x"}}, meta)  # $ne matches absent fields
    assert not matches({"size": {"$gt": "a"}}, meta)  # ordering only within a kind
    assert matches({"$or": [{"color": "blue"}, {"size": {"$in": [1, 3]}}]}, meta)
    assert matches({"nested": {"$exists": True}, "other": {"$exists": False}}, meta)


@pytest.mark.parametrize(
    "bad",
    [
        {"a": {"$near": 1}},
        {"$xor": [{"a": 1}]},
        {"a": {"$in": "x"}},
        {"a": {"$exists": 1}},
        {"a": None},
        {"a": {}},
        {"$or": []},
        {"a..b": 1},
        {"a": 2**60},
        "not a dict",
    ],
)
def test_malformed_filters_are_rejected(bad) -> None:
    with pytest.raises(InvalidInputError):
        validate(bad)


def test_a_field_name_is_data_never_sql(open_memory: Callable[..., Memory]) -> None:
    """Quotes, braces and commas in a key match that key (they once built a SQL literal on
    PostgreSQL: a key could end the string and run its own SQL)."""
    with open_memory(embedder="hash") as mem:
        mem.add("odd keys", metadata={"we'ird,{key}": 1, "n": 1})
        assert mem.count(filters={"we'ird,{key}": 1}) == 1
        assert mem.count(filters={"we'ird,{key}": 2}) == 0
        assert mem.count(filters={"a'; DROP TABLE records; --": 1}) == 0
        assert mem.count(filters={"n": {"$gte": 1}}) == 1
