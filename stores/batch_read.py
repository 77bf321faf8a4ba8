"""Many record bodies read from segment files in runs, each checked against its checksum.

Neighbouring records of one segment are read with one `preadv` (the few header bytes between
two bodies land in a scratch buffer), a run of about a megabyte at a time, and each body's
checksum is verified at once, while its bytes are still in the CPU's cache. Runs are shared
out to reader threads: `preadv` and the hash both release the GIL, so one thread's read
overlaps another's verification.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import xxhash

RUN_BYTES = 1 << 20  # a run's bytes: read, then verified while still in cache
_GAP_BYTES = 4096  # records further apart than this start a new run (never read the gap)
try:
    _IOV_MAX = os.sysconf("SC_IOV_MAX")
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 1024
SHORT = "short read"
CHECKSUM = "checksum"


@dataclass(frozen=True)
class BodyRead:
    """One body to read: where it lies, the buffers its bytes go to in order (they add up to
    `length`), and the checksum they must match."""

    fd: int
    offset: int
    length: int
    views: Sequence[memoryview]
    checksum: int


def read_bodies(
    reads: Sequence[BodyRead], helpers: Executor | None = None, threads: int = 1
) -> list[str | None]:
    """Read every body into its buffers; per read, None when its bytes arrived whole and match
    their checksum, else why not (`SHORT`, `CHECKSUM`, or the error the read raised).

    The runs are shared out to `threads` threads as each becomes free: this one and
    `threads - 1` of `helpers` (no more than there are runs)."""
    outcome: list[str | None] = [None] * len(reads)
    planned = list(_runs(reads))
    runs = iter(planned)  # each thread takes the next run left (under the GIL)

    def work() -> None:
        for run in runs:
            for n, why in zip(run, _read_run([reads[n] for n in run]), strict=True):
                outcome[n] = why

    shares = []
    if helpers is not None:
        shares = [helpers.submit(work) for _ in range(min(threads, len(planned)) - 1)]
    work()
    for share in shares:
        share.result()
    return outcome


def _runs(reads: Sequence[BodyRead]) -> Iterator[list[int]]:
    """Indexes of `reads` grouped into runs: one file, in file order, each body close after
    the last, up to RUN_BYTES and the system's limit on buffers per call."""
    order = sorted(range(len(reads)), key=lambda n: (reads[n].fd, reads[n].offset))
    run: list[int] = []
    start = end = buffers = 0
    for n in order:
        read = reads[n]
        joins = (
            run
            and read.fd == reads[run[-1]].fd
            and 0 <= read.offset - end <= _GAP_BYTES
            and read.offset + read.length - start <= RUN_BYTES
            and buffers + len(read.views) + 1 <= _IOV_MAX
        )
        if not joins:
            if run:
                yield run
            run, start, buffers = [], read.offset, 0
        run.append(n)
        buffers += len(read.views) + 1
        end = read.offset + read.length
    if run:
        yield run


def _read_run(run: list[BodyRead]) -> list[str | None]:
    """One `preadv` for the run, then each body's checksum."""
    start = run[0].offset
    buffers: list[memoryview] = []
    position = start
    for read in run:
        if read.offset > position:
            buffers.append(memoryview(bytearray(read.offset - position)))
        buffers.extend(read.views)
        position = read.offset + read.length
    try:
        arrived = os.preadv(run[0].fd, buffers, start)
    except OSError as exc:
        return [f"read failed: {exc}"] * len(run)
    outcome: list[str | None] = []
    for read in run:
        if arrived < read.offset + read.length - start:
            outcome.append(SHORT)
            continue
        digest = xxhash.xxh3_64()
        for view in read.views:
            digest.update(view)
        outcome.append(None if digest.intdigest() == read.checksum else CHECKSUM)
    return outcome
