"""Vector search in PostgreSQL (pgvector): the true top-k under filters whichever way the
search goes, the HNSW index built with the configured parameters, no state in the process."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from memlayer import AsyncMemory, Memory
from memlayer.retrievers.pg_vector import PgVectorSearch
from memlayer.retrievers.vector_index import IndexConfig

pytestmark = pytest.mark.postgres

DIM = 16
COUNT = 1500


def _vectors(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


STORED = _vectors(0, COUNT)
TEXTS = [f"item {i}" for i in range(COUNT)]
BY_TEXT = dict(zip(TEXTS, STORED, strict=True))


def lookup(texts: list[str]) -> np.ndarray:
    """A fixed vector per stored text (anything else, like the width probe: the first)."""
    return np.stack([BY_TEXT.get(text, STORED[0]) for text in texts])


@pytest.fixture
def url(postgres_url: str) -> Iterator[str]:
    with Memory(url=postgres_url, embedder=lookup) as memory:
        memory.add_many(
            [
                {
                    "text": text,
                    "id": text,
                    "metadata": {"rare": i % 100 == 0, "half": i % 2 == 0, "i": i},
                }
                for i, text in enumerate(TEXTS)
            ]
        )
    yield postgres_url


def exact(query: np.ndarray, k: int, allowed: np.ndarray) -> list[str]:
    """The true top-k by cosine among `allowed` (indices into STORED)."""
    scores = STORED[allowed] @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [TEXTS[i] for i in allowed[order]]


def record_paths(monkeypatch: pytest.MonkeyPatch, hnsw_keeps: int | None = None) -> list[str]:
    """Record which way each ranking went ("hnsw" or "exact"); with `hnsw_keeps`, HNSW
    answers only that many of its rows."""
    paths: list[str] = []
    ranked = PgVectorSearch._ranked

    def recorded(
        self: PgVectorSearch, conn: Any, query: Any, k: int, cond: Any, ef: Any, *rest: Any
    ) -> Any:
        paths.append("exact" if ef is None else "hnsw")
        found = ranked(self, conn, query, k, cond, ef, *rest)
        return found if ef is None else found[:hnsw_keeps]

    monkeypatch.setattr(PgVectorSearch, "_ranked", recorded)
    return paths


@pytest.fixture
def short_hnsw(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """HNSW as pgvector before 0.8 answers a selective filter: only the matches among its
    ef_search candidates (a few here, whatever the graph), so the fallback must run."""
    return record_paths(monkeypatch, hnsw_keeps=3)


@pytest.mark.parametrize(
    ("config", "path"),
    [
        (IndexConfig(pg_exact_below=0), ["hnsw", "exact"]),  # short under the filter: exact
        (IndexConfig(pg_exact_below=10**9), ["exact"]),  # the planner expects few matches
    ],
    ids=["hnsw-then-exact", "exact"],
)
def test_a_selective_filter_gets_the_true_top_k(
    url: str, config: IndexConfig, path: list[str], short_hnsw: list[str]
) -> None:
    rare = np.flatnonzero(np.arange(COUNT) % 100 == 0)  # 15 of 1500 records
    with Memory(url=url, embedder=lookup, index_config=config) as memory:
        for seed in range(5):
            query = _vectors(100 + seed, 1)[0]
            hits = memory.search_by_vector(query, k=10, filters={"rare": True})
            assert [h.id for h in hits] == exact(query, 10, rare)
            assert [h.score for h in hits] == pytest.approx(
                sorted((float(STORED[int(h.id.split()[1])] @ query) for h in hits), reverse=True),
                abs=1e-5,
            )
    assert short_hnsw == path * 5


def test_an_iterative_index_scan_fills_k_under_a_filter_without_the_exact_path(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With table statistics the planner takes HNSW for a filter half the records match;
    pgvector 0.8's iterative scan walks on past ef_search=10 candidates until 10 match
    (without it about 5 of them would, and the exact path would run)."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE records")
    engine.dispose()
    paths = record_paths(monkeypatch)
    half = np.flatnonzero(np.arange(COUNT) % 2 == 0)
    recalled = []
    config = IndexConfig(pg_exact_below=0, hnsw_ef_search=10)
    with Memory(url=url, embedder=lookup, index_config=config) as memory:
        for seed in range(5):
            query = _vectors(300 + seed, 1)[0]
            hits = memory.search_by_vector(query, k=10, filters={"half": True})
            assert len(hits) == 10 and all(int(h.id.split()[1]) % 2 == 0 for h in hits)
            recalled.append(len({h.id for h in hits} & set(exact(query, 10, half))) / 10)
    assert paths == ["hnsw"] * 5
    assert np.mean(recalled) >= 0.9


def test_unfiltered_search_through_hnsw_finds_the_nearest(url: str) -> None:
    everything = np.arange(COUNT)
    recalled = []
    with Memory(url=url, embedder=lookup, index_config=IndexConfig(pg_exact_below=0)) as memory:
        for seed in range(20):
            query = _vectors(200 + seed, 1)[0]
            found = {h.id for h in memory.search_by_vector(query, k=10)}
            recalled.append(len(found & set(exact(query, 10, everything))) / 10)
    assert np.mean(recalled) >= 0.95


def _analyzed(url: str) -> None:
    """Refresh the planner's statistics (and `pg_class.reltuples`) of the records table."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE records")
    engine.dispose()


def _statements(memory: Memory) -> tuple[list[str], list[int]]:
    """What each later search sends to the server, by kind ("explain": the planner's
    estimate, "settings": the way's settings, "rank": a statement reading records), and how
    many pooled connections it checks out."""
    from sqlalchemy import event

    sent: list[str] = []
    checkouts: list[int] = []
    engine = memory._records.engine

    def kind(statement: str) -> str:
        if statement.startswith("EXPLAIN"):
            return "explain"
        return "settings" if "set_config(" in statement else "rank"

    def executing(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(kind(statement))

    event.listen(engine, "before_cursor_execute", executing)
    event.listen(engine.pool, "checkout", lambda *_: checkouts.append(1))
    return sent, checkouts


def test_a_search_is_one_statement_on_one_connection_with_an_estimate_only_when_filtered(
    url: str,
) -> None:
    """Ranking and reading the hits' records are one statement, on one connection: a whole
    tenant alone in a table the planner knows to be large goes through HNSW without the
    planner's estimate; a filter asks for it first (it picks exact or HNSW; the exact way
    needs no settings); nothing else is sent, and the hits are those of the exact search."""
    _analyzed(url)
    config = IndexConfig(pg_exact_below=100)  # 1,500 records: "large"; 15 rare ones: few
    rare = np.flatnonzero(np.arange(COUNT) % 100 == 0)
    with Memory(url=url, embedder=lookup, index_config=config) as memory:
        sent, checkouts = _statements(memory)
        query = _vectors(400, 1)[0]
        hits = memory.search_by_vector(query, k=10)
        assert (sent, len(checkouts)) == (["settings", "rank"], 1)
        assert len(set(h.id for h in hits) & set(exact(query, 10, np.arange(COUNT)))) >= 9
        assert hits[0].text == hits[0].id and hits[0].metadata["i"] == int(hits[0].id[5:])
        assert len(memory.search_by_vector(query, k=1200)) == 1200  # past pgvector's ef 1,000
        for filters, allowed in (({"rare": True}, rare), ({"i": {"$in": [3, 5]}}, [3, 5])):
            sent.clear()
            checkouts.clear()
            hits = memory.search_by_vector(query, k=10, filters=filters)
            assert (sent, len(checkouts)) == (["explain", "rank"], 1), filters
            assert [h.id for h in hits] == exact(query, 10, np.asarray(allowed))
        sent.clear()
        hits = memory.search_by_vector(query, k=10, filters={"half": True})  # HNSW
        assert sent == ["explain", "settings", "rank"]
        assert len(hits) == 10 and all(h.metadata["half"] for h in hits)
        sent.clear()
        memory.search("item 7", k=3, mode="vector", user_id="nobody")  # a scope: estimated
        assert sent == ["explain", "rank"]  # (nobody: few, exact)


def test_a_whole_tenant_search_beside_other_tenants_asks_for_the_estimate(url: str) -> None:
    """A tenant that shares the table may be small (then exact, as under a filter): the
    settings' statement finds another tenant, and the planner is asked; every search stays
    in its own tenant."""
    config = IndexConfig(pg_exact_below=100)
    with Memory(url=url, embedder=lookup, index_config=config) as memory:
        memory.add_many([{"text": t, "id": t} for t in TEXTS[:5]], tenant_id="small")
        _analyzed(url)
        sent, checkouts = _statements(memory)
        query = _vectors(401, 1)[0]
        hits = memory.search_by_vector(query, k=10, tenant_id="small")
        assert sent == ["settings", "explain", "settings", "rank"] and len(checkouts) == 1
        assert [h.id for h in hits] == exact(query, 5, np.arange(5))
        assert all(h.scope.tenant_id == "small" for h in hits)
        sent.clear()
        hits = memory.search_by_vector(query, k=10)  # the default tenant: 1,500, HNSW
        assert sent == ["settings", "explain", "rank"]
        assert len(hits) == 10 and all(h.scope.tenant_id is None for h in hits)


def test_the_hnsw_index_has_the_configured_parameters(postgres_url: str) -> None:
    from sqlalchemy import create_engine, text

    config = IndexConfig(hnsw_m=8, hnsw_ef_construction=40)
    Memory(url=postgres_url, embedder="hash", index_config=config).close()
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        definition = conn.execute(
            text("SELECT indexdef FROM pg_indexes WHERE indexname = 'records_embedding_hnsw'")
        ).scalar_one()
    engine.dispose()
    assert "hnsw" in definition and "vector_cosine_ops" in definition
    assert "m='8'" in definition and "ef_construction='40'" in definition


SEARCH_IN_ANOTHER_PROCESS = """
import sys
from memlayer import AsyncMemory, Memory
with Memory(url=sys.argv[1], embedder="hash") as memory:
    print("|".join(h.text for h in memory.search("harbour lights", k=2, mode="hybrid")))
    memory.add("written by the other worker", id="theirs")
"""


def test_workers_share_everything_through_the_database(postgres_url: str) -> None:
    with (
        Memory(url=postgres_url, embedder="hash") as one,
        Memory(url=postgres_url, embedder="hash") as two,
    ):
        one.add("the harbour lights at dawn", id="mine")
        assert [h.id for h in two.search("harbour lights", k=1, mode="vector")] == ["mine"]
        run = subprocess.run(
            [sys.executable, "-c", SEARCH_IN_ANOTHER_PROCESS, postgres_url],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert run.stdout.strip() == "the harbour lights at dawn"
        assert [h.id for h in one.search("other worker", k=1, mode="keyword")] == ["theirs"]
        two.delete("mine")
        assert one.search("harbour lights", mode="vector") == [
            h for h in one.search("harbour lights", mode="vector") if h.id != "mine"
        ]
        assert one.get("mine") is None


def _indexes(url: str) -> dict[str, str]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'records'")
        ).all()
    engine.dispose()
    return dict(rows)


def test_a_bulk_load_builds_the_hnsw_index_once_after_and_searches_like_adds(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bulk_add drops the HNSW index for the load (the rows go in without the graph) and
    builds it from all of them after; the results are those of records added one call at a
    time."""
    seen_during: list[bool] = []
    store = PgVectorSearch.bulk_load

    def watched(self: PgVectorSearch) -> Any:
        manager = store(self)

        class Watch:
            def __enter__(self) -> None:
                manager.__enter__()
                seen_during.append("records_embedding_hnsw" in _indexes(postgres_url))

            def __exit__(self, *exc: Any) -> Any:
                return manager.__exit__(*exc)

        return Watch()

    monkeypatch.setattr(PgVectorSearch, "bulk_load", watched)
    items = [{"text": t, "id": t, "metadata": {"i": i}} for i, t in enumerate(TEXTS)]
    config = IndexConfig(hnsw_m=8, pg_exact_below=0)
    with Memory(url=postgres_url, embedder=lookup, index_config=config) as memory:
        ids = memory.bulk_add(items, batch_size=400, progress=False)
        assert ids == TEXTS and memory.count() == COUNT
        assert seen_during == [False]
        assert "m='8'" in _indexes(postgres_url)["records_embedding_hnsw"]
        everything = np.arange(COUNT)
        for seed in range(10):
            query = _vectors(300 + seed, 1)[0]
            found = [h.id for h in memory.search_by_vector(query, k=10)]
            assert len(set(found) & set(exact(query, 10, everything))) >= 9
        assert memory.get("item 7").metadata == {"i": 7}


def test_a_bulk_load_of_many_users_builds_the_index_once_after(postgres_url: str) -> None:
    """`bulk_loading()` around one `add_many` per user: no HNSW index during the load, one
    after it, and each user's records found in that user's scope only."""
    with Memory(url=postgres_url, embedder=lookup) as memory:
        with memory.bulk_loading():
            for user in range(4):
                memory.add_many(TEXTS[user * 100 : (user + 1) * 100], user_id=f"u{user}")
                assert "records_embedding_hnsw" not in _indexes(postgres_url)
        assert "records_embedding_hnsw" in _indexes(postgres_url)
        hits = memory.search_by_vector(BY_TEXT[TEXTS[250]], k=3, user_id="u2")
        assert hits[0].text == TEXTS[250]
        assert all(TEXTS.index(h.text) // 100 == 2 for h in hits)


def test_an_async_bulk_load_builds_the_index_once_after(postgres_url: str) -> None:
    async def load(memory: AsyncMemory) -> list[bool]:
        during = []
        async with memory.bulk_loading():
            for user in range(2):
                await memory.add_many(TEXTS[user * 50 : (user + 1) * 50], user_id=f"u{user}")
                during.append("records_embedding_hnsw" in _indexes(postgres_url))
        return during

    with Memory(url=postgres_url, embedder=lookup) as memory:
        assert asyncio.run(load(AsyncMemory.wrap(memory))) == [False, False]
        assert "records_embedding_hnsw" in _indexes(postgres_url)
        assert memory.count(user_id="u1") == 50


def test_a_bulk_load_with_a_bad_item_stores_nothing_and_keeps_the_index(postgres_url: str) -> None:
    items: list[Any] = [{"text": t} for t in TEXTS[:500]] + [{"text": ""}]
    with Memory(url=postgres_url, embedder=lookup) as memory:
        with pytest.raises(Exception, match=r"items\[500\]"):
            memory.bulk_add(items, progress=False)
        with pytest.raises(Exception, match="batch_size"):
            memory.bulk_add(TEXTS[:3], batch_size=0)
        assert memory.count() == 0
    assert "records_embedding_hnsw" in _indexes(postgres_url)


def test_an_equality_filter_can_be_answered_by_the_metadata_index(url: str) -> None:
    """`{"rare": true}` and `$in` compile to jsonb containment that the GIN index serves."""
    from sqlalchemy import create_engine, select

    from memlayer.stores import filters

    engine = create_engine(url)
    with Memory(url=url, embedder=lookup) as memory:
        table = memory._records.records
        for where in ({"rare": True}, {"i": {"$in": [3, 5]}}):
            stmt = select(table.c.rowid).where(
                filters.to_sql(where, table.c.metadata, "postgresql")
            )
            compiled = stmt.compile(engine, compile_kwargs={"literal_binds": True})
            with engine.begin() as conn:
                conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plan = "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {compiled}"))
            assert "records_metadata" in plan, plan
        assert memory.count(filters={"i": {"$in": [3, 5]}}) == 2
    engine.dispose()


def test_a_bulk_load_builds_its_index_past_the_statement_timeout(postgres_url: str) -> None:
    """The statement timeout is for queries; the index build after a load takes as long as
    it takes (here a wide graph over the rows: seconds, against a 0.5 s timeout)."""
    from memlayer import DatabaseOptions

    config = IndexConfig(hnsw_m=64, hnsw_ef_construction=1000)
    options = DatabaseOptions(statement_timeout_s=0.5)
    items = [{"text": t, "id": t} for t in TEXTS]
    with Memory(url=postgres_url, embedder=lookup, index_config=config, database=options) as m:
        started = time.perf_counter()
        m.bulk_add(items, batch_size=100, progress=False)
        assert time.perf_counter() - started > 0.5  # the build outlasted the timeout
        assert m.count() == COUNT
    assert "ef_construction='1000'" in _indexes(postgres_url)["records_embedding_hnsw"]


def test_embeddings_stay_in_the_row_not_in_toast(postgres_url: str) -> None:
    """A 384-d vector (1.5 kB) with a few hundred characters of text crosses PostgreSQL's
    2 kB row threshold; pgvector's default storage would move the vector out to the TOAST
    table, and every exact distance would fetch it from there."""
    from sqlalchemy import create_engine

    rng = np.random.default_rng(7)

    def wide(texts: list[str]) -> np.ndarray:
        return rng.standard_normal((len(texts), 384)).astype(np.float32)

    words = ["harbour", "lights", "tide", "pilot", "anchor", "beacon", "channel", "mooring"]
    with Memory(url=postgres_url, embedder=wide) as memory:
        memory.add_many([{"text": " ".join(rng.choice(words, 80)) + f" {i}"} for i in range(50)])
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        out_of_row = conn.exec_driver_sql(  # PostgreSQL 17+
            "SELECT count(*) FROM records WHERE pg_column_toast_chunk_id(embedding) IS NOT NULL"
        ).scalar()
    engine.dispose()
    assert out_of_row == 0


def _vacuumed(url: str) -> None:
    """VACUUM ANALYZE the records (the visibility map an index-only scan relies on)."""
    from sqlalchemy import create_engine

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("VACUUM ANALYZE records")
    engine.dispose()


def test_a_filter_key_index_ranks_a_filter_from_the_index_alone(url: str) -> None:
    """With `pg_filter_keys`, an equality filter on such a key is ranked exactly by an
    index-only scan of its covering index (no row of the table read), and the hits are the
    true top-k."""
    from sqlalchemy import event

    config = IndexConfig(pg_filter_keys=("rare", "i"), pg_exact_below=100)
    rare = np.flatnonzero(np.arange(COUNT) % 100 == 0)
    with Memory(url=url, embedder=lookup, index_config=config) as memory:
        _vacuumed(url)
        engine = memory._records.engine
        ranked: list[tuple[str, Any]] = []

        def executing(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
            if "ORDER BY" in statement:
                ranked.append((statement, parameters))

        event.listen(engine, "before_cursor_execute", executing)
        for seed, (filters, allowed) in enumerate(
            (({"rare": True}, rare), ({"i": {"$in": [3, 5, 700]}}, [3, 5, 700]))
        ):
            query = _vectors(500 + seed, 1)[0]
            hits = memory.search_by_vector(query, k=10, filters=filters)
            assert [h.id for h in hits] == exact(query, 10, np.asarray(allowed))
        event.remove(engine, "before_cursor_execute", executing)
        for statement, parameters in ranked:
            with engine.begin() as conn:
                for setting in ("enable_seqscan", "enable_bitmapscan"):
                    conn.exec_driver_sql(f"SET LOCAL {setting} = off")
                plan = "\n".join(
                    row[0] for row in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)
                )
            assert "Index Only Scan using records_filter_" in plan, plan
            assert "hnsw" not in plan, plan


def test_filters_on_indexed_keys_match_what_they_match_unindexed(postgres_url: str) -> None:
    """jsonb equality on an indexed key selects the records containment selects, whatever
    the stored value's type (a number, its text, a boolean, an array, nested, missing)."""
    values: list[Any] = [7, "7", 7.0, True, [7], {"b": 7}, None, "x"]
    items = [
        {"text": f"v{i}", "id": f"v{i}", "metadata": {"k": v, "a": {"b": v}}}
        for i, v in enumerate(values)
    ] + [{"text": "none", "id": "none", "metadata": {}}]
    cases: list[dict[str, Any]] = [
        {"k": 7},
        {"k": "7"},
        {"k": True},
        {"k": {"$in": [7, "x"]}},
        {"k": {"$ne": 7}},
        {"k": {"$nin": ["7", True]}},
        {"a.b": 7},
        {"$or": [{"k": "x"}, {"a.b": True}]},
    ]
    found: dict[bool, list[list[str]]] = {}
    for indexed in (False, True):
        keys = ("k", "a.b") if indexed else ()
        config = IndexConfig(pg_filter_keys=keys)
        with Memory(url=postgres_url, embedder=lookup, index_config=config) as memory:
            if not indexed:
                memory.add_many(items)
            query = STORED[0]
            found[indexed] = [
                sorted(h.id for h in memory.search_by_vector(query, k=20, filters=f)) for f in cases
            ]
    assert found[True] == found[False]
    assert found[True][0] == ["v0", "v2"]  # 7 and 7.0 are one number to jsonb


def test_filter_keys_are_checked(postgres_url: str) -> None:
    """A key that is not a dotted path of words, vectors too wide for an index entry, and
    a record too large for one are refused, naming the field; nothing is stored."""
    from memlayer import InvalidInputError

    for keys in (("shard'; DROP TABLE records; --",), ("a..b",), ("",), "shard"):
        with pytest.raises(InvalidInputError) as error:
            IndexConfig(pg_filter_keys=keys)  # type: ignore[arg-type]
        assert error.value.field == "pg_filter_keys"
    wide = lambda texts: np.ones((len(texts), 768), np.float32)  # noqa: E731
    with pytest.raises(InvalidInputError) as error:
        Memory(url=postgres_url, embedder=wide, index_config=IndexConfig(pg_filter_keys=("k",)))
    assert error.value.field == "pg_filter_keys"
    config = IndexConfig(pg_filter_keys=("k",))
    with Memory(url=postgres_url, embedder=lookup, index_config=config) as memory:
        with pytest.raises(InvalidInputError) as error:
            note = secrets.token_urlsafe(4000)  # random: no compression brings it under
            memory.add("big", id="big", metadata={"k": 1, "note": note})
        assert error.value.field == "metadata"
        assert memory.count() == 0
        memory.add("small", id="small", metadata={"k": 1})
        assert [h.id for h in memory.search_by_vector(STORED[0], k=3, filters={"k": 1})] == [
            "small"
        ]


def test_a_filter_index_left_invalid_by_a_failed_build_is_built_again(postgres_url: str) -> None:
    """Filter indexes are built concurrently (writers go on); one a failed build left
    invalid, which the planner would never use, is dropped and built again at the next
    open."""
    from sqlalchemy import create_engine

    validity = (
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname LIKE 'records_filter_k_%%'"
    )
    config = IndexConfig(pg_filter_keys=("k",))
    engine = create_engine(postgres_url)
    with Memory(url=postgres_url, embedder=lookup, index_config=config) as memory:
        memory.add("item 1", id="a", metadata={"k": 1})
    with engine.begin() as conn:
        assert conn.exec_driver_sql(validity).scalars().all() == [True]
        conn.exec_driver_sql(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = "
            "(SELECT oid FROM pg_class WHERE relname LIKE 'records_filter_k_%%')"
        )
    with Memory(url=postgres_url, embedder=lookup, index_config=config) as memory:
        assert [h.id for h in memory.search_by_vector(STORED[1], k=3, filters={"k": 1})] == ["a"]
    with engine.begin() as conn:
        assert conn.exec_driver_sql(validity).scalars().all() == [True]
    engine.dispose()


def test_filter_keys_come_from_the_environment_for_a_default_memory(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`MEMLAYER_PG_FILTER_KEYS` gives a Memory opened without an index_config (as each
    `memlayer serve` worker opens one) its filter indexes."""
    from sqlalchemy import create_engine

    monkeypatch.setenv("MEMLAYER_PG_FILTER_KEYS", "lang, project.id")
    with Memory(url=postgres_url, embedder=lookup) as memory:
        assert memory._records.indexed_paths == {"lang", "project.id"}
    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        names = conn.exec_driver_sql(
            "SELECT indexname FROM pg_indexes WHERE indexname LIKE 'records_filter_%%'"
        ).scalars()
        assert sorted(name.rsplit("_", 1)[0] for name in names) == [
            "records_filter_lang",
            "records_filter_project_id",
        ]
    engine.dispose()
