"""Crash safety: a record acknowledged by add() survives SIGKILL of the writing process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged = -1
    deadline = time.monotonic() + 60
    while acknowledged < 40 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if line:
            acknowledged = int(line)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert acknowledged >= 40, "writer made too little progress"
    with Memory(path=folder, embedder="hash") as memory:
        for i in range(acknowledged + 1):
            hit = memory.get(f"r{i}")
            assert hit is not None and hit.metadata == {"i": i}
        found = memory.search("acknowledged record", k=acknowledged + 1, mode="vector")
        assert {f"r{i}" for i in range(acknowledged + 1)} <= {hit.id for hit in found}
