"""SIGKILL writer processes at random points and drain every acknowledgement they sent.

Writers are forked by a forkserver that imported memlayer once, so a kill costs a fork,
not an interpreter start with torch. A writer sends index i on a pipe after the call that
wrote record i returned; after the kill the parent reads the pipe to its end, so it knows
the true last acknowledged index, even one sent a moment before the kill.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
import torch

from memlayer import Memory
from memlayer.stores import PageStore, disk_tier
from memlayer.types import Page

CONTEXT = multiprocessing.get_context("forkserver")
# The server imports these once, Memory's lazy imports included (this module is not on its
# path: each child gets the parent's path and imports it, quickly once these are loaded).
CONTEXT.set_forkserver_preload(
    [
        "torch",
        "faiss",
        "sqlalchemy.dialects.sqlite",
        "memlayer.memory",
        "memlayer.stores.page_store",
    ]
)
STORE = {"ram_budget": "2MiB", "segment_bytes": "1MiB"}  # pages of 1 KiB to 1 MiB
WORDS = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "glacier", "harbor", "indigo"]


@dataclass(frozen=True)
class Tear:
    """Stop the write of record number `record` after `keep` of its bytes (at most all but
    one), then SIGKILL the writer: a kill in the middle of a record."""

    record: int
    keep: int


def kill_writer(
    target: Callable[..., None],
    *args: Any,
    rng: random.Random,
    acks: int | None,
    max_delay_s: float,
    timeout_s: float = 60,
) -> tuple[list[int], int | None]:
    """Run `target(pipe, *args)` in a forked child, SIGKILL it at a random moment once it has
    acknowledged `acks` writes (None: once it died by itself), and read the pipe to its end.

    Returns every index acknowledged before the kill, in order, and the child's exit code.
    """
    reader, writer = CONTEXT.Pipe(duplex=False)
    child = CONTEXT.Process(target=target, args=(writer, *args), daemon=True)
    child.start()
    writer.close()  # the child holds the only write end: its death ends the pipe
    received = _receive(reader, acks, time.monotonic() + timeout_s)
    if acks is not None:
        time.sleep(rng.uniform(0, max_delay_s))  # not aligned with acknowledgements
    if child.is_alive():  # a writer that tears a record has killed itself
        child.kill()  # SIGKILL
    child.join()
    received += _receive(reader, None, None)
    reader.close()
    return received, child.exitcode


def _receive(reader: Connection, count: int | None, deadline: float | None) -> list[int]:
    """Up to `count` acknowledgements (None: all until the pipe ends) before `deadline`."""
    received: list[int] = []
    while count is None or len(received) < count:
        wait = None if deadline is None else max(deadline - time.monotonic(), 0)
        if not reader.poll(wait):
            break
        try:
            received.append(reader.recv())
        except EOFError:
            break
    return received


def crash_seed() -> int:
    """The seed of a crash test: MEMLAYER_CRASH_SEED when set (to repeat a failure), else new."""
    return int(os.environ.get("MEMLAYER_CRASH_SEED") or random.SystemRandom().randrange(2**32))


def page_id(seed: int, round_: int, i: int) -> str:
    return f"s{seed}/r{round_}/p{i}"


def page_tensor(seed: int, round_: int, i: int) -> torch.Tensor:
    """Page i of a round: 512 to 512Ki bfloat16 values (1 KiB to 1 MiB), from the seed."""
    rng = random.Random(page_id(seed, round_, i))
    generator = torch.Generator().manual_seed(rng.randrange(2**63))
    return torch.randn(int(2 ** rng.uniform(9, 19)), generator=generator).bfloat16()


def page_writer(acks: Connection, folder: str, seed: int, round_: int, tear: Tear | None) -> None:
    """Put pages into a PageStore forever, sending i once put of page i has returned."""
    if tear is not None:
        _tear_record(tear)
    store = PageStore.open(path=folder, **STORE)
    for i in itertools.count():
        store.put(Page(id=page_id(seed, round_, i), payload={"k": page_tensor(seed, round_, i)}))
        acks.send(i)


def _tear_record(tear: Tear) -> None:
    """Make the disk tier's write of record `tear.record` stop partway and kill the process."""
    write_all = disk_tier.write_all
    calls = itertools.count()

    def tearing(fd: int, data: bytes) -> None:
        if next(calls) == tear.record:
            os.write(fd, data[: min(tear.keep, len(data) - 1)])
            os.kill(os.getpid(), signal.SIGKILL)
        write_all(fd, data)

    disk_tier.write_all = tearing


def record_id(seed: int, round_: int, i: int) -> str:
    return f"s{seed}-r{round_}-{i}"


def record_text(seed: int, round_: int, i: int) -> str:
    """Record i of a round: 3 to 300 words, from the seed."""
    rng = random.Random(record_id(seed, round_, i))
    words = rng.choices(WORDS, k=rng.randint(3, 300))
    return f"{record_id(seed, round_, i)} " + " ".join(words)


def memory_writer(acks: Connection, where: str, seed: int, round_: int) -> None:
    """Add records to a Memory (a folder, or a database URL) forever, sending i once add of
    record i has returned."""
    location = {"url": where} if "://" in where else {"path": where}
    memory = Memory(**location, embedder="hash")
    for i in itertools.count():
        memory.add(
            record_text(seed, round_, i),
            id=record_id(seed, round_, i),
            metadata={"round": round_, "i": i},
        )
        acks.send(i)


# pid, call, fd, the fd's path (strace -y), the rest of the line
_TRACED = re.compile(r"^\d+\s+(\w+)\((\d+)<([^>]*)>(.*)$")


@dataclass(frozen=True)
class Call:
    """One traced system call on a file descriptor: its name, fd, the fd's path, the rest."""

    name: str
    fd: int
    path: str
    rest: str


def traced(script: str, *args: str) -> list[Call]:
    """Run `script` in a fresh interpreter under strace and return, in order, its writes and
    syncs (write, pwrite64, fsync, fdatasync) with the path of each fd.

    Skips where strace is missing or may not trace; fails instead under CI=true, where
    .ci/run installs it.
    """
    strace = shutil.which("strace")
    if strace is None:
        _unavailable("strace is not installed")
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "trace"
        command = [strace, "-f", "-y", "-s", "64", "-o", str(log)]
        command += ["-e", "trace=write,pwrite64,fsync,fdatasync"]
        result = subprocess.run(
            [*command, sys.executable, "-c", script, *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if "ptrace" in result.stderr and not log.exists():
            _unavailable(f"strace cannot trace here: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
        lines = log.read_text(errors="replace").splitlines()
    return [
        Call(m.group(1), int(m.group(2)), m.group(3), m.group(4))
        for m in map(_TRACED.match, lines)
        if m
    ]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run this test (.ci/run installs strace)")
    pytest.skip(reason)


def acknowledged(calls: list[Call], prefix: str) -> list[tuple[int, int]]:
    """(position in `calls`, index) of every acknowledgement `prefix i` written to stdout."""
    found = []
    for position, call in enumerate(calls):
        ack = re.match(rf', "{prefix} (\d+)\\n"', call.rest)
        if call.name == "write" and call.fd == 1 and ack:
            found.append((position, int(ack.group(1))))
    return found


def synced_after(calls: list[Call], write: int, end: int) -> bool:
    """Whether the file written by `calls[write]` is fsync'ed (or fdatasync'ed) before `end`."""
    path = calls[write].path
    return any(
        call.name in ("fsync", "fdatasync") and call.path == path for call in calls[write + 1 : end]
    )
