"""The page store under real faults: SIGKILL at random points, the order of write, fsync and
acknowledgement, a full disk, and PostgreSQL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from crash import (
    STORE,
    Tear,
    acknowledged,
    crash_seed,
    kill_writer,
    page_id,
    page_tensor,
    page_writer,
    synced_after,
    traced,
)

from memlayer.errors import StorageError
from memlayer.stores import DiskTier, PageStore, SQLTier, disk_tier
from memlayer.stores.disk_tier import HEADER_BYTES, MAGIC
from memlayer.types import Page

KILLS = 12  # with test_memory_crash.py's kills, more than 20 per run


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a bfloat16 tensor, for a bit-exact comparison."""
    return tensor.view(torch.int16)


def draw_tear(rng: random.Random, round_: int) -> Tear | None:
    """Every third round the writer tears a record itself: 1 to 40 bytes in (the header and
    the id), or anywhere up to 1 MiB in (the body); the others are killed from outside."""
    if round_ % 3 != 2:
        return None
    return Tear(rng.randrange(6), rng.choice([rng.randint(1, 40), rng.randint(41, 2**20)]))


def check_store(folder: str, expected: dict[str, torch.Tensor], later_id: str, where: str) -> int:
    """Reopen: no corruption, every acknowledged page bit-exact; then one more put.
    Returns how many torn tails the reopen cut."""
    with PageStore.open(path=folder, **STORE) as store:
        disk = store.tiers[-1]
        assert isinstance(disk, DiskTier)
        assert disk.stats()["corrupt"] == 0 and disk.verify() == [], where
        for pid, tensor in expected.items():
            assert torch.equal(bits(store.get(pid)[0].payload["k"]), bits(tensor)), (
                f"{pid}, {where}"
            )
        later = Page(id=later_id, payload={"k": torch.arange(7).bfloat16()})
        store.put(later)
        expected[later.id] = later.payload["k"]
        return int(disk.stats()["torn"] or 0)


def test_random_sigkills_lose_no_acknowledged_page(tmp_path: Path) -> None:
    """SIGKILL a page writer at random moments, a third of the times in mid-record."""
    seed = crash_seed()
    rng = random.Random(seed)
    folder = str(tmp_path / "store")
    expected: dict[str, torch.Tensor] = {}
    torn = 0
    for round_ in range(KILLS):
        tear = draw_tear(rng, round_)
        acks, code = kill_writer(
            page_writer,
            folder,
            seed,
            round_,
            tear,
            rng=rng,
            acks=None if tear else rng.randint(0, 6),
            max_delay_s=0.05,
        )
        where = (
            f"seed {seed} (MEMLAYER_CRASH_SEED replays the plan), "
            f"round {round_}, {tear}, acks {acks}"
        )
        assert code == -signal.SIGKILL and acks == list(range(len(acks))), where
        assert tear is None or len(acks) == tear.record, where
        expected |= {page_id(seed, round_, i): page_tensor(seed, round_, i) for i in acks}
        torn += check_store(folder, expected, f"{page_id(seed, round_, 0)}/after", where)
    assert torn >= KILLS // 3, f"seed {seed}: a torn record was not cut"
    check_store(folder, expected, "final", f"seed {seed}, after the last round")
    assert len(list(Path(folder).glob("segment-*.log"))) > 1, f"seed {seed}"


class SyscallLog:
    """Wraps the disk tier's write_all and fsync to log, in order, what reached which file:
    ("write", file, start, end, bytes), ("fsync", file) and the test's own ("ack", call)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[object, ...]] = []
        write_all, fsync = disk_tier.write_all, disk_tier.fsync

        def logged_write(fd: int, data: bytes) -> None:
            start = os.fstat(fd).st_size
            write_all(fd, data)
            self.events.append(("write", file_key(fd), start, start + len(data), bytes(data)))

        def logged_fsync(fd: int) -> None:
            fsync(fd)
            self.events.append(("fsync", file_key(fd)))

        monkeypatch.setattr(disk_tier, "write_all", logged_write)
        monkeypatch.setattr(disk_tier, "fsync", logged_fsync)

    def ack(self, call: str) -> None:
        """Log that a call of the tier (named by the test) has returned."""
        self.events.append(("ack", call))


def file_key(fd: int) -> tuple[int, int]:
    """Which file an fd is (device, inode): a segment, or the tier's folder."""
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def record_of(event: tuple[object, ...], page_id: str, op: int) -> bool:
    """Whether a logged write is the whole record of `op` on `page_id`."""
    data = event[4]
    assert isinstance(data, bytes)
    key = page_id.encode()
    return (
        data[:4] == MAGIC
        and data[4] == op
        and data[HEADER_BYTES : HEADER_BYTES + len(key)] == key
        and int.from_bytes(data[5:7], "little") == len(key)
    )


def assert_synced_before_ack(
    events: list[tuple[object, ...]], ack: str, page_id: str, op: int
) -> None:
    """The record's bytes were written, then its file fsync'ed, then the call returned."""
    returned = events.index(("ack", ack))
    writes = [
        n for n in range(returned) if events[n][0] == "write" and record_of(events[n], page_id, op)
    ]
    assert writes, f"{ack}: no record written before the call returned"
    file = events[writes[-1]][1]
    assert ("fsync", file) in events[writes[-1] + 1 : returned], f"{ack}: returned before fsync"


def test_put_returns_only_after_its_record_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SIGKILL tests cannot tell fsync from no fsync; this checks the order itself: each
    record's bytes land in its segment, the segment is fsync'ed, a new segment's folder entry
    is fsync'ed, and only then do put, put_many and evict return."""
    log = SyscallLog(monkeypatch)
    folder = tmp_path / "d"
    tier = DiskTier(folder, segment_bytes=8 * 2**10)
    pages = [Page(id=f"p{i}", payload=bytes([i]) * (1000 + 300 * i)) for i in range(12)]
    for page in pages[:8]:
        tier.put(page)
        log.ack(page.id)
    tier.put_many(pages[8:])
    for page in pages[8:]:
        log.ack(page.id)
    tier.evict("p3")
    log.ack("evict p3")
    tier.close()
    events = log.events
    for page in pages:
        assert_synced_before_ack(events, page.id, page.id, 1)
    assert_synced_before_ack(events, "evict p3", "p3", 2)
    folder_key = (folder.stat().st_dev, folder.stat().st_ino)
    segments = list(dict.fromkeys(e[1] for e in events if e[0] == "write"))
    assert len(segments) > 2
    for segment in segments:
        first = next(n for n, e in enumerate(events) if e[0] == "write" and e[1] == segment)
        earlier = [n for n in range(first) if events[n][0] == "write"]
        since = earlier[-1] + 1 if earlier else 0
        assert ("fsync", folder_key) in events[since:first], "a segment's folder entry unsynced"
    on_disk = {p.stat().st_ino: p.read_bytes() for p in folder.glob("segment-*.log")}
    for event in events:
        if event[0] == "write":
            _, (_, inode), start, end, data = event
            assert on_disk[inode][start:end] == data  # the bytes logged are the bytes on disk


TRACED_WRITER = """
import os, sys
from memlayer.stores import DiskTier
from memlayer.types import Page
tier = DiskTier(sys.argv[1], segment_bytes=4096)
for i in range(6):
    tier.put(Page(id=f"id{i:04d}x", payload=bytes([i]) * 1500))
    os.write(1, f"put {i}\\n".encode())
"""


def test_traced_put_is_fsynced_before_it_is_acknowledged(tmp_path: Path) -> None:
    """The same order seen from outside: strace on a real writer process, the system calls
    themselves (segments roll every two records)."""
    calls = traced(TRACED_WRITER, str(tmp_path / "d"))
    acks = acknowledged(calls, "put")
    assert [i for _, i in acks] == list(range(6))
    previous = 0
    for position, i in acks:
        writes = [
            n
            for n in range(previous, position)
            if calls[n].name == "write"
            and calls[n].path.endswith(".log")
            and f"id{i:04d}x" in calls[n].rest
        ]
        assert writes, f"put {i}: its record was not written before the acknowledgement"
        assert synced_after(calls, writes[-1], position), f"put {i}: acknowledged before fsync"
        previous = position


FULL_DISK = """
import resource, signal, sys
from memlayer.errors import StorageError
from memlayer.stores import DiskTier
from memlayer.types import Page
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
tier = DiskTier(sys.argv[1])
tier.put(Page(id="small", payload=b"x" * 1000))
resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))
try:
    tier.put(Page(id="big", payload=b"y" * 20000))
except StorageError as exc:
    print("refused:", exc)
tier.put(Page(id="fits", payload=b"z" * 1000))
print("ok")
"""


def test_full_disk_is_a_clear_error_and_damages_nothing(tmp_path: Path) -> None:
    """A real write failure (file size limit: EFBIG, as a full disk gives ENOSPC)."""
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "refused: disk full writing page 'big'" in result.stdout
    tier = DiskTier(tmp_path / "d")
    assert set(tier.ids()) == {"small", "fits"}
    assert tier.get("fits").payload == b"z" * 1000
    assert tier.stats()["corrupt"] == 0
    tier.close()


def test_storage_error_is_an_oserror_a_caller_can_catch() -> None:
    assert issubclass(StorageError, OSError)


@pytest.mark.postgres
def test_sql_tier_on_real_postgresql(postgres_url: str) -> None:
    pages = [
        Page(id=f"p{i}", payload={"k": torch.randn(3, 8).bfloat16(), "n": torch.arange(i + 1)})
        for i in range(10)
    ]
    tier = SQLTier(postgres_url, table="pages_test")
    tier.put_many(pages)
    tier.put(pages[0])  # upsert
    assert len(tier) == 10 and tier.nbytes > 0
    other = SQLTier(postgres_url, table="pages_test")  # a second worker sees the same pages
    for page in pages:
        got = other.get(page.id)
        assert isinstance(got.payload, dict)
        assert torch.equal(got.payload["k"].view(torch.int16), page.payload["k"].view(torch.int16))
        assert torch.equal(got.payload["n"], page.payload["n"])
    other.evict("p3")
    assert "p3" not in tier
    with PageStore.open(ram_budget="1KiB", url=postgres_url) as store:
        store.put(Page(id="via-store", payload=b"shared"))
        assert store.get("via-store")[0].payload == b"shared"
    tier.close()
    other.close()
