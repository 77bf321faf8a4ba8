"""Disk tier: append-only segment files of checksummed page records, read by memory map.

A record is a fixed header (magic, op, id length, body checksum, body length, header
checksum), the page id and the encoded page; checksums are 64-bit XXH3, which verifies a
page at memory speed (CRC32 ran at a fifth of a raw read). `put` returns only after the
record is fsync'ed, so an acknowledged page survives `kill -9`; a torn record at the end
of the newest segment is cut off when the tier opens, and earlier records are never
rewritten. A record whose checksum fails is reported, counted and skipped, never returned
as data. Deletes append a tombstone; `compact` copies live records into fresh segments and
removes the old ones.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from memlayer.errors import (
    CapacityError,
    ClosedError,
    CorruptionError,
    InvalidInputError,
    NotFoundError,
    StorageError,
)
from memlayer.stores.codec import decode, encode
from memlayer.stores.tier import Tier
from memlayer.types import Page

log = logging.getLogger(__name__)

MAGIC = b"MLP2"
OLD_MAGIC = b"MLPG"  # format 1 (CRC32), written before memlayer 0.1: not readable here
_HEAD = struct.Struct("<4sBHQQ")  # magic, op, id length, body checksum, body length
_CHECK = struct.Struct("<Q")  # checksum of the head and the id
HEADER_BYTES = _HEAD.size + _CHECK.size
checksum = xxhash.xxh3_64_intdigest
_PUT, _DELETE = 1, 2
_SEGMENT = re.compile(r"^segment-(\d{8})\.log$")


@dataclass(frozen=True)
class Location:
    """Where a page's body lies: segment number, body offset and length."""

    segment: int
    offset: int
    length: int
    checksum: int


def _record(op: int, page_id: str, body: bytes) -> tuple[bytes, int]:
    """The record's bytes and its body checksum."""
    key = page_id.encode()
    body_checksum = checksum(body)
    head = _HEAD.pack(MAGIC, op, len(key), body_checksum, len(body))
    return head + _CHECK.pack(checksum(head + key)) + key + body, body_checksum


class DiskTier(Tier):
    """Pages in segment files under `path` (one writer process; many reader threads)."""

    persistent = True

    def __init__(
        self,
        path: str | Path,
        *,
        budget: int | None = None,
        segment_bytes: int = 256 * 2**20,
        sync: bool = True,
    ) -> None:
        super().__init__()
        if segment_bytes <= HEADER_BYTES:
            raise InvalidInputError("segment_bytes", f"must exceed {HEADER_BYTES}", segment_bytes)
        self.name = "disk"
        self.path = Path(path)
        self.budget = budget
        self.segment_bytes = segment_bytes
        self.sync = sync
        self.corrupt: list[tuple[int, int]] = []  # (segment, offset) of records skipped
        self._index: dict[str, Location] = {}
        self._live_bytes = 0
        self._maps: dict[int, mmap.mmap] = {}
        self._lock = threading.RLock()
        self._closed = False
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.path}: {exc}") from exc
        segments = self._segments()
        for number in segments:
            self._scan(number, last=number == segments[-1])
        self._active = segments[-1] if segments else 1
        self._fd = self._open_segment(self._active)

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
        self.put_many([page])
        return []

    def put_many(self, pages: Sequence[Page]) -> None:
        """Append pages and fsync once; returns when all of them are durable."""
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
            self._flush()

    def get(self, page_id: str, *, transient: bool = False) -> Page:
        """The page. `transient`: its tensors are views of the segment's private memory map
        (no copy at all), for callers that copy them at once and never write to them."""
        with self._lock:
            self._check_open()
            location = self._index.get(page_id)
            if location is None:
                self.counters.misses += 1
                raise NotFoundError("page", page_id)
            body = self._view(location) if transient else self._read(location)
        if checksum(body) != location.checksum:
            self._report(location.segment, location.offset)
            with self._lock:
                if self._index.get(page_id) == location:
                    self._forget(page_id)
            raise CorruptionError(f"page {page_id!r}: checksum mismatch in segment {location}")
        self.counters.hits += 1
        return decode(body)

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

    def stats(self) -> dict[str, float | int | str | None]:
        return {**super().stats(), "segments": len(self._segments()), "corrupt": len(self.corrupt)}

    # -- maintenance ----------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Check every live record's checksum; drop and return the ids that fail."""
        bad = []
        for page_id in self.ids():
            with self._lock:
                location = self._index.get(page_id)
                body = self._read(location) if location else memoryview(b"")
            if location and checksum(body) != location.checksum:
                self._report(location.segment, location.offset)
                with self._lock:
                    self._forget(page_id)
                bad.append(page_id)
        return bad

    def compact(self) -> int:
        """Rewrite live pages into fresh segments and delete the old files; bytes freed."""
        with self._lock:
            self._check_open()
            old = self._segments()
            before = sum(self._segment_path(n).stat().st_size for n in old)
            self._roll()
            for page_id, location in sorted(self._index.items(), key=lambda kv: kv[1].offset):
                body = self._read(location)
                if checksum(body) != location.checksum:
                    self._report(location.segment, location.offset)
                    self._forget(page_id)
                    continue
                self._append(_PUT, page_id, bytes(body))
            self._flush()
            for number in old:  # oldest first: a tombstone never outlives the put it hides
                self._maps.pop(number, None)  # unmapped once no transient page views it
                self._segment_path(number).unlink()
            self._sync_dir()
            after = sum(self._segment_path(n).stat().st_size for n in self._segments())
            return before - after

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
        self._sync_dir()
        return fd

    def _sync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
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

    def _append(self, op: int, page_id: str, body: bytes) -> None:
        record, body_checksum = _record(op, page_id, body)
        if (
            os.fstat(self._fd).st_size + len(record) > self.segment_bytes
            and os.fstat(self._fd).st_size
        ):
            self._roll()
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            os.ftruncate(self._fd, start)  # leave no torn record behind
            kind = "disk full" if exc.errno in (errno.ENOSPC, errno.EFBIG) else "write failed"
            raise StorageError(f"{kind} writing page {page_id!r} to {self.path}: {exc}") from exc
        if op == _PUT:
            offset = start + HEADER_BYTES + len(page_id.encode())
            self._forget(page_id)
            self._index[page_id] = Location(self._active, offset, len(body), body_checksum)
            self._live_bytes += len(body)

    def _flush(self, *, force: bool = False) -> None:
        if self.sync or force:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise StorageError(f"fsync failed in {self.path}: {exc}") from exc

    def _forget(self, page_id: str) -> None:
        location = self._index.pop(page_id, None)
        if location is not None:
            self._live_bytes -= location.length

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

    def _report(self, segment: int, offset: int) -> None:
        self.corrupt.append((segment, offset))
        log.error(
            "memlayer disk tier %s: corrupt record in segment %d at %d, skipped",
            self.path,
            segment,
            offset,
        )

    def _scan(self, number: int, *, last: bool) -> None:
        """Index a segment's records from their headers; cut a torn tail off the newest."""
        path = self._segment_path(number)
        if path.stat().st_size == 0:
            return
        with open(path, "rb") as handle:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            if data[: len(OLD_MAGIC)] == OLD_MAGIC:
                raise StorageError(
                    f"{path} is in disk format 1 (CRC32 records), which this memlayer does "
                    "not read: re-create the store, or read it with the version that wrote it"
                )
            self._scan_records(number, data, last=last)
        finally:
            data.close()

    def _scan_records(self, number: int, data: mmap.mmap, *, last: bool) -> None:
        path = self._segment_path(number)
        position = 0
        while position < len(data):
            parsed = self._parse(data, position)
            if parsed is None:
                resync = data.find(MAGIC, position + 1)
                if resync < 0:
                    if last:
                        log.warning(
                            "memlayer disk tier %s: cut torn tail of segment %d at %d",
                            self.path,
                            number,
                            position,
                        )
                        with open(path, "r+b") as handle:
                            handle.truncate(position)
                            os.fsync(handle.fileno())
                    else:
                        self._report(number, position)
                    return
                self._report(number, position)
                position = resync
                continue
            op, page_id, body_offset, length, body_checksum = parsed
            self._forget(page_id)
            if op == _PUT:
                self._index[page_id] = Location(number, body_offset, length, body_checksum)
                self._live_bytes += length
            position = body_offset + length

    @staticmethod
    def _parse(data: mmap.mmap, position: int) -> tuple[int, str, int, int, int] | None:
        """(op, id, body offset, body length, body checksum) of the record at `position`."""
        if position + HEADER_BYTES > len(data):
            return None
        magic, op, key_length, body_checksum, length = _HEAD.unpack_from(data, position)
        (head_checksum,) = _CHECK.unpack_from(data, position + _HEAD.size)
        key_start = position + HEADER_BYTES
        body_offset = key_start + key_length
        head = data[position : position + _HEAD.size] + data[key_start:body_offset]
        if magic != MAGIC or op not in (_PUT, _DELETE) or checksum(head) != head_checksum:
            return None
        if body_offset + length > len(data):
            return None
        try:
            page_id = data[key_start:body_offset].decode()
        except UnicodeDecodeError:
            return None
        return op, page_id, body_offset, length, body_checksum
