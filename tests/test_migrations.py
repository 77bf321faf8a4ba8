"""Schema migrations: every database a released memlayer wrote opens upgraded with its records
intact, a fresh database matches the tables the code reads and writes, deployments that
migrate separately are refused a database that is behind, and concurrent openers migrate once.

The fixtures were written by memlayer 0.2.0's own code: `memory-0.2.0` (SQLite) and
`memory-0.2.0-postgres.sql` (pg_dump of a PostgreSQL database: embeddings as bytea, json
metadata), each holding the same nine records.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from memlayer import DatabaseOptions, Memory
from memlayer.errors import StorageError
from memlayer.stores import migrations
from memlayer.stores.database import open_engine, sqlite_url
from memlayer.stores.records import RecordStore
from tests.backends import fresh_database

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


def _revision(url: str) -> str | None:
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            return migrations.current(conn)
    finally:
        engine.dispose()


def _sqlite_020(tmp_path: Path) -> Path:
    folder = tmp_path / "old"
    shutil.copytree(FIXTURES / "memory-0.2.0", folder)
    return folder


def _postgres_020(server: Any) -> str:
    """A new database restored from the 0.2.0 dump with the server's own psql."""
    url = fresh_database(server)
    psql = Path(server.bin_path) / "psql"
    plain = url.replace("postgresql+psycopg://", "postgresql://", 1)
    subprocess.run(
        [
            str(psql),
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            str(FIXTURES / "memory-0.2.0-postgres.sql"),
            plain,
        ],
        check=True,
        capture_output=True,
    )
    return url


def _check_020_records(memory: Memory) -> None:
    """What 0.2.0 stored, read back through every path."""
    assert memory.count(tenant_id="acme") == 6 and memory.count(tenant_id="globex") == 2
    hit = memory.get("note-1", tenant_id="acme")
    assert hit is not None and hit.text == "Ada prefers window seats."
    assert hit.metadata == {"kind": "pref", "doc": {"year": 2024}} and hit.scope.user_id == "ada"
    assert memory.get("note-1", tenant_id="globex").text == "Globex's own note about lunch."
    assert memory.get("note-3", session_id="s1").text == "The meeting moved to 3pm."
    assert memory.get("gone", tenant_id="acme") is None
    assert [h.id for h in memory.search("東京", mode="keyword", tenant_id="globex")] == ["jp-1"]
    top = memory.search("handbook travel policy", k=5, mode="vector", tenant_id="acme")
    assert {h.id for h in top} == {f"hb-{i}" for i in range(5)}
    filtered = memory.search("handbook", k=5, tenant_id="acme", filters={"section": {"$gte": 3}})
    assert sorted(h.id for h in filtered) == ["hb-3", "hb-4"]
    new = memory.add("Handbook addendum: trains.", tenant_id="acme", metadata={"section": 5})
    assert memory.get(new, tenant_id="acme").metadata == {"section": 5}


def test_a_sqlite_store_written_by_0_2_0_opens_upgraded(tmp_path: Path) -> None:
    folder = _sqlite_020(tmp_path)
    url = sqlite_url(folder / "memory.db")
    assert _revision(url) == "0002"  # recognised by its layout: 0.2.0 kept no version table
    with Memory(path=folder, embedder="hash") as memory:
        _check_020_records(memory)
    assert _revision(url) == migrations.head()


@pytest.mark.postgres
def test_a_postgres_database_written_by_0_2_0_opens_upgraded(postgres_server: Any) -> None:
    """0.2.0 kept embeddings as float32 bytes and metadata as json; the upgrade moves them to
    pgvector and jsonb, so vector search, filters and keyword search work on them."""
    url = _postgres_020(postgres_server)
    assert _revision(url) == "0002"
    with Memory(url=url, embedder="hash") as memory:
        _check_020_records(memory)
    assert _revision(url) == migrations.head()
    with Memory(url=url, embedder="hash") as memory:  # upgraded once, opens as current
        assert memory.count(tenant_id="acme") == 7


def test_a_store_written_by_0_1_0_is_stamped_and_upgraded(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    shutil.copytree(FIXTURES / "memory-0.1.0", folder)
    url = sqlite_url(folder / "memory.db")
    assert _revision(url) == "0001"
    Memory(path=folder, embedder="hash").close()
    assert _revision(url) == migrations.head()


def _compare(url: str) -> list[Any]:
    """Differences between a database at head and the tables the code reads and writes,
    leaving out what the keyword and vector indexes build for themselves."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    store = RecordStore(url, embedder_name="hash-64", dim=64, keywords=str.lower)
    own = {"records_fts", migrations.VERSION_TABLE}

    def include(obj: Any, name: str | None, kind: str, reflected: bool, _other: Any) -> bool:
        if kind == "table":
            return not (name or "").startswith("records_fts") and name not in own
        return not reflected or (obj.table.name not in own and not (name or "").endswith("_tsv"))

    try:
        with store.engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"include_object": include, "compare_type": True}
            )
            return list(compare_metadata(context, store.schema))
    finally:
        store.close()


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_fresh_database_at_head_matches_the_code(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "postgres":
        url = fresh_database(request.getfixturevalue("postgres_server"))
    else:
        url = sqlite_url(tmp_path / "fresh.db")
    assert _compare(url) == []


@pytest.mark.postgres
def test_an_upgraded_0_2_0_database_matches_the_code(postgres_server: Any) -> None:
    assert _compare(_postgres_020(postgres_server)) == []


def test_migrate_false_refuses_a_database_that_is_behind_and_changes_nothing(
    tmp_path: Path,
) -> None:
    folder = _sqlite_020(tmp_path)
    url = sqlite_url(folder / "memory.db")
    before = (folder / "memory.db").read_bytes()
    with pytest.raises(StorageError, match="memlayer db upgrade"):
        Memory(path=folder, embedder="hash", database=DatabaseOptions(migrate=False))
    assert (folder / "memory.db").read_bytes() == before and _revision(url) == "0002"


def test_memlayer_db_upgrade_then_a_non_migrating_open(tmp_path: Path) -> None:
    folder = _sqlite_020(tmp_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "memlayer.cli", "db", *args, "--path", str(folder)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    status = cli("current")
    assert status.returncode == 0 and status.stdout.split() == [
        "0002",
        "(head:",
        f"{migrations.head()})",
    ]
    upgraded = cli("upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"0002 -> {migrations.head()}" in upgraded.stdout
    assert cli("upgrade").stdout.strip() == f"already at {migrations.head()}"
    with Memory(path=folder, embedder="hash", database=DatabaseOptions(migrate=False)) as memory:
        _check_020_records(memory)


def test_a_database_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    Memory(path=folder, embedder="hash").close()
    engine = open_engine(sqlite_url(folder / "memory.db"))
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '9999'")
    engine.dispose()
    with pytest.raises(StorageError, match="newer memlayer"):
        Memory(path=folder, embedder="hash")


@pytest.mark.postgres
def test_concurrent_openers_of_an_old_database_upgrade_it_once(postgres_server: Any) -> None:
    """Eight workers open the same 0.2.0 database at once: each opens, the data is whole."""
    url = _postgres_020(postgres_server)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        try:
            barrier.wait()
            with Memory(url=url, embedder="hash") as memory:
                assert memory.count(tenant_id="acme") == 6
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with Memory(url=url, embedder="hash") as memory:
        _check_020_records(memory)
