"""Crash safety: a record acknowledged by add() survives SIGKILL of the writing process."""

from __future__ import annotations

from pathlib import Path

from crash import kill_after_acks

from memlayer import Memory

WRITER = """
import sys
from memlayer import Memory
memory = Memory(path=sys.argv[1], embedder="hash")
i = 0
while True:
    memory.add(f"acknowledged record {i}", id=f"r{i}", metadata={"i": i})
    print(i, flush=True)
    i += 1
"""


def test_sigkill_loses_nothing_acknowledged(tmp_path: Path) -> None:
    folder = tmp_path / "mem"
    acknowledged = kill_after_acks(WRITER, str(folder), at_least=40)
    with Memory(path=folder, embedder="hash") as memory:
        for i in range(acknowledged + 1):
            hit = memory.get(f"r{i}")
            assert hit is not None and hit.metadata == {"i": i}
        found = memory.search("acknowledged record", k=acknowledged + 1, mode="vector")
        assert {f"r{i}" for i in range(acknowledged + 1)} <= {hit.id for hit in found}
