"""Disk tier: append-only segment files of checksummed page records, read by memory map.

A record is a fixed header (magic, op, id length, body checksum, body length, header
checksum), the page id and the encoded page; checksums are 64-bit XXH3, fast enough to
verify every page as it is read. `put` returns only after the record's bytes are fsync'ed,
and `put_many` fsyncs once for all its pages (every write and fsync goes through
`write_all` and `fsync`, so a test can watch the order), so an acknowledged page survives
`kill -9`. Deletes append a tombstone; `compact` copies live records into fresh segments
and removes the old ones.

Torn and corrupt are told apart, because one is cut and the other never is:

- A record is **torn** when its segment ends before the record's declared end: the file
  ends inside the fixed header, inside the id the header covers (unless the stored id
  length with one byte changed makes the header check out: then that length is what is
  damaged), or inside the body. A torn record was never acknowledged (`put` returns after
  the whole record is written), so a torn tail of the newest segment is cut when the tier
  opens, and only that tail. A segment that is not the newest is never written again, so
  one that ends inside a record was damaged after it was sealed: that is corrupt.
- A record is **corrupt** when all of it is present and a check fails: the magic or op
  is wrong, the header checksum fails (its lengths are then not trusted: the scan goes on
  at the next magic, and everything in between is one damaged region), or the body
  checksum fails. Corruption is reported (`verify()`, `stats()["corrupt"]`, an error in the
  log), never returned as data and never removed: its bytes stay where they are, in any
  position of any segment. A newest segment that ends in damage is sealed when the tier
  opens and new records go to a fresh segment, so nothing is ever appended behind bytes
  whose length is not known.
- A record whose body fails its checksum keeps its place in the index: `get` raises
  `CorruptionError` for it every time (never `NotFoundError`, which would say it was never
  stored), `verify()` names it, and `ids()` and `nbytes` count it, until a `put` of the
  same id replaces it or `evict` deletes it. `compact` copies it with its recorded
  checksum, so it stays corrupt, and copies each damaged region whose header failed into
  `quarantine/` (logged) before its segment is removed.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import xxhash

from memlayer.errors import (
    CapacityError,
    ClosedError,
    CorruptionError,
    InvalidInputError,
    NotFoundError,
    StorageError,
)
from memlayer.stores.batch_read import CHECKSUM, BodyRead, read_bodies
from memlayer.stores.codec import TensorLayout, decode, encode, read_header
from memlayer.stores.tier import Tier
from memlayer.types import Page

log = logging.getLogger(__name__)
Signature = tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]  # as TensorTier's slabs key

MAGIC = b"MLP2"
OLD_MAGIC = b"MLPG"  # format 1 (CRC32), written before memlayer 0.1: not readable here
_HEAD = struct.Struct("<4sBHQQ")  # magic, op, id length, body checksum, body length
_CHECK = struct.Struct("<Q")  # checksum of the head and the id
HEADER_BYTES = _HEAD.size + _CHECK.size
checksum = xxhash.xxh3_64_intdigest
_PUT, _DELETE = 1, 2
_SEGMENT = re.compile(r"^segment-(\d{8})\.log$")
QUARANTINE = "quarantine"
_TORN = "the segment ends inside the record"


def write_all(fd: int, data: bytes) -> None:
    """Append all of `data` to `fd` (opened with O_APPEND).

    The tier's only data write, so a test can wrap it and see which bytes went where.
    """
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync(fd: int) -> None:
    """fsync `fd`. The tier's only durability call, so a test can wrap it and check that
    `put` returns only after the bytes it wrote were synced."""
    os.fsync(fd)


@dataclass(frozen=True)
class Location:
    """Where a page's body lies: segment number, body offset and length."""

    segment: int
    offset: int
    length: int
    checksum: int


@dataclass(frozen=True)
class _Parsed:
    """A page body's header, parsed once: where its tensor bytes start, the page without its
    payload, and its tensors in order. Records are never rewritten, so it stays true for
    as long as the page id names the same record."""

    start: int
    page: Page
    layout: TensorLayout
    signature: Signature


@dataclass(frozen=True)
class Damage:
    """A corrupt stretch of a segment: bytes [`offset`, `end`) of `segment` and why.

    `page_id` names the page when a header that checks out vouches for it (a body that
    fails its checksum); it is None when the header itself failed.
    """

    segment: int
    offset: int
    end: int
    reason: str
    page_id: str | None = None


@dataclass(frozen=True)
class _Frame:
    """A record whose header checks out and whose body is all present."""

    op: int
    page_id: str
    location: Location

    @property
    def end(self) -> int:
        return self.location.offset + self.location.length


def _signature(layout: TensorLayout) -> Signature:
    return tuple((name, dtype, shape) for name, dtype, shape, _ in layout)


def _record(
    op: int, page_id: str, body: bytes, body_checksum: int | None = None
) -> tuple[bytes, int]:
    """The record's bytes and its body checksum; a `body_checksum` given is kept as it was
    recorded, so copying a corrupt body never makes it pass."""
    key = page_id.encode()
    if body_checksum is None:
        body_checksum = checksum(body)
    head = _HEAD.pack(MAGIC, op, len(key), body_checksum, len(body))
    return head + _CHECK.pack(checksum(head + key)) + key + body, body_checksum


def _read_frame(data: mmap.mmap, position: int, segment: int) -> _Frame | str:
    """The record at `position`, or why there is none: `_TORN`, or the check that failed."""
    present = data[position : position + HEADER_BYTES]
    if len(present) < HEADER_BYTES:
        return _TORN if _plausible_start(present) else "bad magic or op"
    magic, op, key_length, body_checksum, length = _HEAD.unpack_from(data, position)
    if magic != MAGIC or op not in (_PUT, _DELETE):
        return "bad magic or op"  # a torn record's bytes are what was written: never this
    (head_checksum,) = _CHECK.unpack_from(data, position + _HEAD.size)
    key_start = position + HEADER_BYTES
    body_offset = key_start + key_length
    if body_offset > len(data):
        return "damaged id length" if _id_length_damaged(data, position) else _TORN
    key = data[key_start:body_offset]
    if checksum(present[: _HEAD.size] + key) != head_checksum:
        return "header checksum"
    try:
        page_id = key.decode()
    except UnicodeDecodeError:
        return "id is not UTF-8"
    if body_offset + length > len(data):
        return _TORN
    return _Frame(op, page_id, Location(segment, body_offset, length, body_checksum))


def _plausible_start(present: bytes) -> bool:
    """Whether bytes cut short inside a fixed header could start a record this tier wrote."""
    return MAGIC.startswith(present[:4]) and (len(present) <= 4 or present[4] in (_PUT, _DELETE))


def _id_length_damaged(data: mmap.mmap, position: int) -> bool:
    """Whether the header at `position`, whose id seems to run past the end of the file,
    checks out once its id length is changed in one byte.

    Then the header is complete and that field is damaged (corrupt); otherwise the file
    ends inside the id (torn).
    """
    magic, op, stored, body_checksum, length = _HEAD.unpack_from(data, position)
    (head_checksum,) = _CHECK.unpack_from(data, position + _HEAD.size)
    key_start = position + HEADER_BYTES
    room = len(data) - key_start
    for key_length in _one_byte_changes(stored):
        if key_length <= room:
            head = _HEAD.pack(magic, op, key_length, body_checksum, length)
            if checksum(head + data[key_start : key_start + key_length]) == head_checksum:
                return True
    return False


def _one_byte_changes(value: int) -> Iterator[int]:
    """Every 16-bit value that differs from `value` in exactly one of its two bytes."""
    for shift in (0, 8):
        for byte in range(256):
            candidate = (value & ~(0xFF << shift)) | (byte << shift)
            if candidate != value:
                yield candidate


def _resync(data: mmap.mmap, position: int) -> int:
    """Where the next record may start after a header that failed: the next magic."""
    found = data.find(MAGIC, position + 1)
    return len(data) if found < 0 else found


class DiskTier(Tier):
    """Pages in segment files under `path` (one writer process; many reader threads).

    `read_threads`: the threads a batch read (`read_many_into`, how a RAM tier above
    promotes pages) spreads its reads and checksums over."""

    persistent = True

    def __init__(
        self,
        path: str | Path,
        *,
        budget: int | None = None,
        segment_bytes: int = 256 * 2**20,
        sync: bool = True,
        name: str = "disk",
        read_threads: int = 2,
    ) -> None:
        super().__init__()
        if segment_bytes <= HEADER_BYTES:
            raise InvalidInputError("segment_bytes", f"must exceed {HEADER_BYTES}", segment_bytes)
        if read_threads < 1:
            raise InvalidInputError("read_threads", "must be at least 1", read_threads)
        self.read_threads = read_threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = os.getpid()
        self.name = name
        self.path = Path(path)
        self.budget = budget
        self.segment_bytes = segment_bytes
        self.sync = sync
        self.torn: list[tuple[int, int]] = []  # (segment, offset) of torn tails cut on open
        self._damaged: dict[tuple[int, int], Damage] = {}  # regions whose framing failed
        self._bad_bodies: dict[str, Damage] = {}  # indexed pages whose body failed
        self._index: dict[str, Location] = {}
        self._live_bytes = 0
        self._maps: dict[int, mmap.mmap] = {}
        self._readers: dict[int, int] = {}  # segment -> read-only fd for read_many_into
        self._parsed: dict[str, _Parsed] = {}  # headers read_many_into parsed (or put wrote)
        self._lock = threading.RLock()
        self._closed = False
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.path}: {exc}") from exc
        segments = self._segments()
        ends_damaged = False
        for number in segments:
            ends_damaged = self._scan(number, newest=number == segments[-1])
        self._active = segments[-1] if segments else 1
        self._fd = self._open_segment(self._active)
        if ends_damaged:
            self._roll()  # nothing is appended behind bytes whose length is not known

    # -- Tier -----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self._live_bytes

    def __contains__(self, page_id: object) -> bool:
        return page_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def ids(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._index))

    def put(self, page: Page) -> list[Page]:
        return self.put_many([page])

    def put_many(self, pages: Sequence[Page]) -> list[Page]:
        """Append pages and fsync once; returns when all of them are durable. A disk tier
        never evicts: a write past its budget is refused (CapacityError) instead."""
        records = [(page.id, encode(page)) for page in pages]
        with self._lock:
            self._check_open()
            if self.budget is not None:
                adding = sum(len(body) for _, body in records)
                replaced = sum(self._index[i].length for i, _ in records if i in self._index)
                if self._live_bytes + adding - replaced > self.budget:
                    raise CapacityError(
                        f"disk tier budget {self.budget} bytes would be exceeded by {adding}"
                    )
            for page_id, body in records:
                self._append(_PUT, page_id, body)
                self._remember_header(page_id, body)
            self._flush()
        return []

    def get(self, page_id: str, *, transient: bool = False) -> Page:
        """The page. `transient`: its tensors are views of the segment's private memory map
        (no copy at all), for callers that copy them at once and never write to them.
        CorruptionError, every time, for a page whose body fails its checksum."""
        with self._lock:
            self._check_open()
            location = self._index.get(page_id)
            if location is None:
                self.counters.misses += 1
                raise NotFoundError("page", page_id)
            body = self._view(location) if transient else self._read(location)
        if checksum(body) != location.checksum:
            damage = self._body_failed(page_id, location)
            raise CorruptionError(
                f"page {page_id!r}: body checksum mismatch in segment {damage.segment} "
                f"at {damage.offset} (kept on disk, never returned)"
            )
        self.counters.hits += 1
        return decode(body)

    def read_many_into(
        self,
        page_ids: Sequence[str],
        destinations: Callable[[str, Signature], Mapping[str, memoryview] | None],
    ) -> list[Page | StorageError | None]:
        """Read pages' tensors straight into memory the caller gives, with no copy between.

        `destinations(page_id, signature)` returns, per payload name, the writable bytes
        the tensor lands in (or None to decline the page). It is called for every page
        before any bytes are taken from what it returned, so a later call may move an
        earlier page's memory (a slab that grows) when its mapping follows the move.
        Neighbouring records are read with one `preadv`, spread over `read_threads`
        threads, and each checksum is verified over what arrived.

        Per page, in order: the page without its payload; None when it cannot be read this
        way (bytes payload, or declined: use `get`); or the error that refused it
        (CorruptionError, as `get` raises it, or StorageError for a short read), its
        destinations then holding garbage. NotFoundError, before anything is read or any
        destination asked for, when an id is not here.

        A header is parsed once (when `put` writes it, or on the first read of a page found
        on disk) and kept: later reads take the header's bytes and the tensors with no JSON
        on the way; the checksum still covers both."""
        with self._lock:  # compaction closes readers under it: no read through a stale fd
            self._check_open()
            locations = []
            for page_id in page_ids:
                location = self._index.get(page_id)
                if location is None:
                    self.counters.misses += 1
                    raise NotFoundError("page", page_id)
                locations.append(location)
            wanted: list[tuple[int, _Parsed, Mapping[str, memoryview]]] = []
            for n, (page_id, location) in enumerate(zip(page_ids, locations, strict=True)):
                parsed = self._parsed_header(page_id, location)
                fields = destinations(page_id, parsed.signature) if parsed else None
                if parsed is not None and fields is not None:
                    wanted.append((n, parsed, fields))
            reads = [
                BodyRead(
                    self._reader(locations[n].segment),
                    locations[n].offset,
                    locations[n].length,
                    [memoryview(bytearray(parsed.start))]
                    + [fields[name] for name, *_ in parsed.layout],
                    locations[n].checksum,
                )
                for n, parsed, fields in wanted
            ]
            outcomes = read_bodies(reads, self._read_pool(), self.read_threads)
            results: list[Page | StorageError | None] = [None] * len(page_ids)
            for (n, parsed, _), why in zip(wanted, outcomes, strict=True):
                results[n] = self._read_result(page_ids[n], locations[n], parsed, why)
        return results

    def _parsed_header(self, page_id: str, location: Location) -> _Parsed | None:
        """The page's header as kept, else read and parsed (kept once its body checks out);
        None when it does not parse (bytes payload)."""
        parsed = self._parsed.get(page_id)
        if parsed is None:
            prefix = os.pread(
                self._reader(location.segment), min(location.length, 1024), location.offset
            )
            parsed = self._parse(prefix, location)
        return parsed

    def _read_result(
        self, page_id: str, location: Location, parsed: _Parsed, why: str | None
    ) -> Page | StorageError:
        """What `read_many_into` returns for a page read: its header, or the error (call
        under the lock)."""
        if why == CHECKSUM:
            damage = self._body_failed(page_id, location)
            return CorruptionError(
                f"page {page_id!r}: body checksum mismatch in segment {damage.segment} "
                f"at {damage.offset} (kept on disk, never returned)"
            )
        if why is not None:
            return StorageError(f"page {page_id!r}: {why} from segment {location.segment}")
        self._parsed.setdefault(page_id, parsed)  # the header read is the one verified
        self.counters.hits += 1
        return replace(parsed.page, metadata=dict(parsed.page.metadata))

    def _read_pool(self) -> ThreadPoolExecutor | None:
        """The threads that help the caller's with `read_many_into` (None: it reads alone).
        A forked child gets a pool of its own: the parent's threads did not come with it."""
        if self.read_threads > 1 and (self._pool is None or self._pool_pid != os.getpid()):
            self._pool = ThreadPoolExecutor(self.read_threads - 1, thread_name_prefix="disk-read")
            self._pool_pid = os.getpid()
        return self._pool

    @staticmethod
    def _parse(prefix: bytes, location: Location) -> _Parsed | None:
        """The header at the start of a body whose first bytes are `prefix`; None when it
        does not parse or its tensors do not fill the body exactly."""
        found = read_header(prefix)
        if found is None:
            return None
        start, page, layout = found
        if start + sum(nbytes for *_, nbytes in layout) != location.length:
            return None
        return _Parsed(start, page, layout, _signature(layout))

    def _remember_header(self, page_id: str, body: bytes) -> None:
        """Keep the header of a body just written (the next read_many_into skips parsing it)."""
        parsed = self._parse(body[:1024], self._index[page_id])
        if parsed is not None:
            self._parsed[page_id] = parsed

    def get_many(self, page_ids: Sequence[str], *, transient: bool = False) -> list[Page]:
        """The pages, read as `get` reads them (`transient`: views of the memory maps)."""
        return [self.get(page_id, transient=transient) for page_id in page_ids]

    def evict(self, page_id: str) -> None:
        with self._lock:
            self._check_open()
            if page_id not in self._index:
                raise NotFoundError("page", page_id)
            self._append(_DELETE, page_id, b"")
            self._flush()
            self._forget(page_id)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._fd)
            self._maps.clear()  # each map is unmapped once no transient page views it
            for fd in self._readers.values():
                os.close(fd)
            self._readers.clear()
            self._parsed.clear()
            if self._pool is not None:
                self._pool.shutdown()

    def stats(self) -> dict[str, float | int | str | None]:
        return {
            **super().stats(),
            "segments": len(self._segments()),
            "corrupt": len(self.corrupt),
            "torn": len(self.torn),
            "quarantined": len(list((self.path / QUARANTINE).glob("*.bin"))),
        }

    # -- maintenance ----------------------------------------------------------------------

    @property
    def corrupt(self) -> list[Damage]:
        """Every damaged region and body found so far, in file order."""
        with self._lock:
            found = [*self._damaged.values(), *self._bad_bodies.values()]
        return sorted(found, key=lambda damage: (damage.segment, damage.offset))

    def verify(self) -> list[Damage]:
        """Check the body of every indexed page; return all damage known, in file order.

        Regions whose header failed were found when the tier opened; bodies that fail stay
        indexed, so `get` keeps raising CorruptionError for them.
        """
        self._check_open()
        for page_id in self.ids():
            with self._lock:
                location = self._index.get(page_id)
                if location is None:
                    continue  # deleted meanwhile
                body = self._view(location)
            if checksum(body) != location.checksum:
                self._body_failed(page_id, location)
        return self.corrupt

    def compact(self) -> int:
        """Rewrite indexed pages into fresh segments and delete the old files; bytes freed.

        Damaged regions of the old segments are copied into `quarantine/` first, and a page
        whose body fails keeps its recorded checksum, so compaction loses no evidence.
        """
        with self._lock:
            self._check_open()
            old = self._segments()
            before = sum(self._segment_path(n).stat().st_size for n in old)
            kept = self._quarantine(old)
            self._roll()
            for page_id, location in sorted(
                self._index.items(), key=lambda kv: (kv[1].segment, kv[1].offset)
            ):
                body = bytes(self._view(location))
                moved = self._append(_PUT, page_id, body, location.checksum)
                if checksum(body) != location.checksum:
                    self._body_failed(page_id, moved)
            self._flush()
            for number in old:  # oldest first: a tombstone never outlives the put it hides
                self._maps.pop(number, None)  # unmapped once no transient page views it
                reader = self._readers.pop(number, None)
                if reader is not None:
                    os.close(reader)
                self._segment_path(number).unlink()
            self._sync_dir(self.path)
            after = sum(self._segment_path(n).stat().st_size for n in self._segments())
            return before - after - kept

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"disk tier at {self.path}")

    def _segment_path(self, number: int) -> Path:
        return self.path / f"segment-{number:08d}.log"

    def _segments(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.path.iterdir() if (m := _SEGMENT.match(p.name)))

    def _open_segment(self, number: int) -> int:
        try:
            fd = os.open(self._segment_path(number), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot open segment {number} in {self.path}: {exc}") from exc
        self._sync_dir(self.path)
        return fd

    @staticmethod
    def _sync_dir(folder: Path) -> None:
        """Make the folder's entries (a new or removed file) durable."""
        fd = os.open(folder, os.O_RDONLY)
        try:
            fsync(fd)
        finally:
            os.close(fd)

    def flush(self) -> None:
        """Make every record written so far durable (for tiers opened with sync=False)."""
        with self._lock:
            self._check_open()
            self._flush(force=True)

    def _roll(self) -> None:
        self._flush(force=not self.sync)  # a sealed segment is durable before the next opens
        os.close(self._fd)
        self._active += 1
        self._fd = self._open_segment(self._active)

    def _append(
        self, op: int, page_id: str, body: bytes, body_checksum: int | None = None
    ) -> Location:
        """Write one record at the end of the active segment (rolling first when it is
        full); a put enters the index. Where its body lies."""
        record, body_checksum = _record(op, page_id, body, body_checksum)
        if (
            os.fstat(self._fd).st_size + len(record) > self.segment_bytes
            and os.fstat(self._fd).st_size
        ):
            self._roll()
        start = os.fstat(self._fd).st_size
        try:
            write_all(self._fd, record)
        except OSError as exc:
            os.ftruncate(self._fd, start)  # leave no torn record behind
            kind = "disk full" if exc.errno in (errno.ENOSPC, errno.EFBIG) else "write failed"
            raise StorageError(f"{kind} writing page {page_id!r} to {self.path}: {exc}") from exc
        location = Location(self._active, start + len(record) - len(body), len(body), body_checksum)
        if op == _PUT:
            self._forget(page_id)
            self._index[page_id] = location
            self._live_bytes += len(body)
        return location

    def _flush(self, *, force: bool = False) -> None:
        if self.sync or force:
            try:
                fsync(self._fd)
            except OSError as exc:
                raise StorageError(f"fsync failed in {self.path}: {exc}") from exc

    def _forget(self, page_id: str) -> None:
        self._parsed.pop(page_id, None)
        location = self._index.pop(page_id, None)
        if location is not None:
            self._live_bytes -= location.length
        self._bad_bodies.pop(page_id, None)

    def _reader(self, segment: int) -> int:
        """A read-only file descriptor of a segment, opened once (call under the lock)."""
        fd = self._readers.get(segment)
        if fd is None:
            fd = self._readers[segment] = os.open(self._segment_path(segment), os.O_RDONLY)
        return fd

    def _read(self, location: Location) -> memoryview:
        """A copy of one body read through its segment's memory map (neighbours stay on disk)."""
        return memoryview(bytearray(self._view(location)))

    def _view(self, location: Location) -> memoryview:
        """One body in its segment's memory map, without a copy.

        The map is private (copy-on-write), so views are writable for torch without any
        write reaching the file; records are never rewritten, so a view stays valid for as
        long as it is referenced, even after the segment is remapped or compacted away.
        """
        mapped = self._maps.get(location.segment)
        end = location.offset + location.length
        if mapped is None or len(mapped) < end:
            with open(self._segment_path(location.segment), "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[location.segment] = mapped
        return memoryview(mapped)[location.offset : end]

    def _body_failed(self, page_id: str, location: Location) -> Damage:
        """Record (once, logged) that the indexed body of `page_id` fails its checksum."""
        start = location.offset - HEADER_BYTES - len(page_id.encode())
        damage = Damage(
            location.segment, start, location.offset + location.length, "body checksum", page_id
        )
        with self._lock:
            if self._index.get(page_id) == location and page_id not in self._bad_bodies:
                self._bad_bodies[page_id] = damage
                self._report(damage)
        return damage

    def _report(self, damage: Damage) -> None:
        log.error(
            "memlayer disk tier %s: corrupt record in segment %d, bytes %d..%d (%s%s): "
            "kept on disk, never returned",
            self.path,
            damage.segment,
            damage.offset,
            damage.end,
            damage.reason,
            f", page {damage.page_id!r}" if damage.page_id is not None else "",
        )

    def _quarantine(self, segments: Sequence[int]) -> int:
        """Copy every damaged region of `segments` into quarantine/ (fsync'ed, logged) before
        the segments are removed; bytes copied."""
        doomed = [damage for damage in self._damaged.values() if damage.segment in segments]
        if not doomed:
            return 0
        folder = self.path / QUARANTINE
        folder.mkdir(exist_ok=True)
        copied = 0
        for damage in doomed:
            with open(self._segment_path(damage.segment), "rb") as handle:
                handle.seek(damage.offset)
                data = handle.read(damage.end - damage.offset)
            target = folder / f"segment-{damage.segment:08d}-at-{damage.offset}.bin"
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, data)
                fsync(fd)
            finally:
                os.close(fd)
            log.error(
                "memlayer disk tier %s: compaction moved corrupt bytes %d..%d of segment %d to %s",
                self.path,
                damage.offset,
                damage.end,
                damage.segment,
                target,
            )
            del self._damaged[(damage.segment, damage.offset)]
            copied += len(data)
        self._sync_dir(folder)
        return copied

    def _scan(self, number: int, *, newest: bool) -> bool:
        """Index a segment's records, report its damage and cut a torn tail off the newest;
        whether the segment ends in damage."""
        path = self._segment_path(number)
        size = path.stat().st_size
        if size == 0:
            return False
        with open(path, "rb") as handle:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            if data[: len(OLD_MAGIC)] == OLD_MAGIC:
                raise StorageError(
                    f"{path} is in disk format 1 (CRC32 records), which this memlayer does "
                    "not read: re-create the store, or read it with the version that wrote it"
                )
            regions = self._scan_records(number, data, newest=newest)
        finally:
            data.close()
        for damage in regions:
            self._damaged[(damage.segment, damage.offset)] = damage
            self._report(damage)
        return bool(regions) and regions[-1].end == size

    def _scan_records(self, number: int, data: mmap.mmap, *, newest: bool) -> list[Damage]:
        """Index the records of one segment; its damaged regions, merged where they touch.

        Only a torn record at the end of the newest segment that follows a sound record (or
        starts the file) is cut: right behind damage it may be a stray magic inside the
        damaged bytes, so it is kept as part of that damage.
        """
        regions: list[Damage] = []
        position = 0
        while position < len(data):
            found = _read_frame(data, position, number)
            after_damage = bool(regions) and regions[-1].end == position
            if isinstance(found, _Frame):
                self._index_frame(found)
                position = found.end
            elif found == _TORN and newest and not after_damage:
                self._cut(number, position, len(data))
                break
            else:
                end = len(data) if found == _TORN else _resync(data, position)
                if after_damage:
                    regions[-1] = replace(regions[-1], end=end)
                else:
                    regions.append(Damage(number, position, end, found))
                position = end
        return regions

    def _index_frame(self, frame: _Frame) -> None:
        self._forget(frame.page_id)
        if frame.op == _PUT:
            self._index[frame.page_id] = frame.location
            self._live_bytes += frame.location.length

    def _cut(self, number: int, offset: int, size: int) -> None:
        """Cut the torn tail [offset, size) off segment `number` (it was never acknowledged)."""
        log.warning(
            "memlayer disk tier %s: cut torn tail of segment %d, bytes %d..%d",
            self.path,
            number,
            offset,
            size,
        )
        with open(self._segment_path(number), "r+b") as handle:
            handle.truncate(offset)
            fsync(handle.fileno())
        self.torn.append((number, offset))
