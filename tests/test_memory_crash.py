"""Crash safety: a record acknowledged by add() survives SIGKILL of the writing process,
wherever the kill lands (mid-commit included), again and again on one folder."""

from __future__ import annotations

import random
import signal
import sqlite3
from pathlib import Path

from crash import (
    acknowledged,
    crash_seed,
    kill_writer,
    memory_writer,
    record_id,
    record_text,
    synced_after,
    traced,
)

from memlayer import Memory

KILLS = 10  # with test_store_faults.py's kills, more than 20 per run


def integrity(database: Path) -> str:
    """SQLite's own full check of the database file, read only."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])


def check_memory(
    folder: Path, expected: dict[str, tuple[str, dict[str, int]]], later: str, where: str
) -> None:
    """Reopen: a sound database, every acknowledged record exact and found by vector search;
    then one more add, which the next reopen must find."""
    with Memory(folder, embedder="hash") as memory:
        assert integrity(folder / "memory.db") == "ok", where
        for rid, (text, metadata) in expected.items():
            hit = memory.get(rid)
            assert hit is not None, f"{rid} lost, {where}"
            assert (hit.text, hit.metadata) == (text, metadata), f"{rid}, {where}"
        newest = list(expected)[-3:]
        for rid in newest:
            found = memory.search(expected[rid][0], k=5, mode="vector")
            assert rid in {hit.id for hit in found}, f"{rid} not searchable, {where}"
        text = f"{later} written after the crash"
        memory.add(text, id=later, metadata={"after": 1})
        expected[later] = (text, {"after": 1})


def test_random_sigkills_lose_nothing_acknowledged(tmp_path: Path) -> None:
    seed = crash_seed()
    rng = random.Random(seed)
    folder = tmp_path / "mem"
    expected: dict[str, tuple[str, dict[str, int]]] = {}
    for round_ in range(KILLS):
        acks, code = kill_writer(
            memory_writer,
            str(folder),
            seed,
            round_,
            rng=rng,
            acks=rng.randint(0, 8),
            max_delay_s=0.03,
        )
        where = f"seed {seed} (MEMLAYER_CRASH_SEED replays the plan), round {round_}, acks {acks}"
        assert code == -signal.SIGKILL and acks == list(range(len(acks))), where
        for i in acks:
            rid = record_id(seed, round_, i)
            expected[rid] = (record_text(seed, round_, i), {"round": round_, "i": i})
        check_memory(folder, expected, f"{record_id(seed, round_, 0)}-after", where)
    with Memory(folder, embedder="hash") as memory:
        assert all(memory.get(rid) is not None for rid in expected), f"seed {seed}"


TRACED_WRITER = """
import os, sys
from memlayer import Memory
memory = Memory(sys.argv[1], embedder="hash")
for i in range(5):
    memory.add(f"traced record {i}", id=f"t{i}")
    os.write(1, f"add {i}\\n".encode())
"""


def test_traced_add_syncs_the_wal_before_it_is_acknowledged(tmp_path: Path) -> None:
    """SIGKILL cannot tell a synced commit from one in the page cache; strace can: each add
    writes SQLite's WAL and fsyncs it before add returns."""
    calls = traced(TRACED_WRITER, str(tmp_path / "mem"))
    acks = acknowledged(calls, "add")
    assert [i for _, i in acks] == list(range(5))
    previous = 0
    for position, i in acks:
        wal = [
            n
            for n in range(previous, position)
            if calls[n].name == "pwrite64" and calls[n].path.endswith("-wal")
        ]
        assert wal, f"add {i}: nothing written to the WAL before the acknowledgement"
        assert synced_after(calls, wal[-1], position), f"add {i}: acknowledged before fsync"
        previous = position
