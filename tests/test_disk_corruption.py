"""Damaged segment files: a corrupt record is reported and kept, a torn tail is cut.

Every case writes the same two segments (a sealed one and the active one, five records
each), damages one record with one flipped byte or one cut, and reopens the tier.
"""

from __future__ import annotations

import logging
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from memlayer.errors import CorruptionError, NotFoundError
from memlayer.stores.disk_tier import HEADER_BYTES, DiskTier
from memlayer.types import Page

HEAD = struct.Struct("<4sBHQQ")  # the record header as documented: magic, op, id length, ...
PER_SEGMENT = 5
BODY_BYTES = 2048
SEGMENT_BYTES = 11 * 2**10  # five records of ids "p0".."p9" fit, a sixth rolls over
SEALED, ACTIVE = 1, 2
POSITIONS = {"first": 0, "middle": 2, "newest": PER_SEGMENT - 1}
# offsets of the header's fields from the record's start
FIELDS = {
    "magic": 1,
    "op": 4,
    "id length low byte": 5,
    "id length high byte": 6,
    "body checksum": 9,
    "body length": 17,
    "header checksum": 27,
    "id": HEADER_BYTES,
}


@dataclass(frozen=True)
class Span:
    """One record in a segment file: where it starts, where its body starts, where it ends."""

    page_id: str
    start: int
    body: int
    end: int


def payload(index: int) -> bytes:
    """The body of page `index`: seeded random bytes."""
    return random.Random(index).randbytes(BODY_BYTES)


def page_ids() -> list[str]:
    return [f"p{i}" for i in range(2 * PER_SEGMENT)]


def segment_path(folder: Path, number: int) -> Path:
    return folder / f"segment-{number:08d}.log"


def spans(data: bytes) -> list[Span]:
    """The records of an undamaged segment, walked header to header."""
    found, position = [], 0
    while position < len(data):
        _, _, key_length, _, length = HEAD.unpack_from(data, position)
        body = position + HEADER_BYTES + key_length
        key = data[position + HEADER_BYTES : body].decode()
        found.append(Span(key, position, body, body + length))
        position = body + length
    return found


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict[int, list[Span]]]:
    """A folder with a sealed and an active segment of five records each; their spans."""
    folder = tmp_path / "d"
    tier = DiskTier(folder, segment_bytes=SEGMENT_BYTES)
    for i, page_id in enumerate(page_ids()):
        tier.put(Page(id=page_id, payload=payload(i)))
    tier.close()
    layout = {n: spans(segment_path(folder, n).read_bytes()) for n in (SEALED, ACTIVE)}
    assert [len(records) for records in layout.values()] == [PER_SEGMENT, PER_SEGMENT]
    return folder, layout


def flip(path: Path, offset: int, mask: int = 0x01) -> bytes:
    """Flip bits of one byte of a file; the damaged file's bytes."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))
    return bytes(data)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("segment-*.log"))}


def assert_others_intact(tier: DiskTier, *skip: str) -> None:
    for i, page_id in enumerate(page_ids()):
        if page_id not in skip:
            assert tier.get(page_id).payload == payload(i), page_id


def assert_never_returned(tier: DiskTier, victim: str) -> None:
    """`get` refuses the damaged page, and no other page carries its bytes."""
    for transient in (False, True):
        with pytest.raises((CorruptionError, NotFoundError)):
            tier.get(victim, transient=transient)
    index = page_ids().index(victim)
    assert all(tier.get(other).payload != payload(index) for other in tier.ids() if other != victim)


def assert_reported(
    tier: DiskTier, caplog: pytest.LogCaptureFixture, segment: int, span: Span
) -> None:
    """verify() names the record (by id for a body, by place for a header), stats count it,
    and an error was logged."""
    named = [
        d
        for d in tier.verify()
        if d.page_id == span.page_id or (d.segment == segment and d.offset == span.start)
    ]
    assert named, tier.corrupt
    assert all(d.segment == segment and d.offset <= span.start < d.end for d in named)
    assert tier.stats()["corrupt"] >= 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "corrupt" in r.message]
    assert any(f"segment {segment}," in r.message for r in errors), caplog.text


def check_damaged(
    folder: Path,
    segment: int,
    span: Span,
    damaged: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
    unwritten: tuple[str, ...] = (),
) -> None:
    """The whole contract for one damaged record, then a write that survives a reopen;
    `unwritten`: pages whose records were torn, so never acknowledged."""
    tier = DiskTier(folder, segment_bytes=SEGMENT_BYTES)
    assert_never_returned(tier, span.page_id)
    assert_reported(tier, caplog, segment, span)
    assert_others_intact(tier, span.page_id, *unwritten)
    tier.put(Page(id="late", payload=b"written after the damage"))
    tier.close()
    after = files(folder)
    assert all(after[name].startswith(data) for name, data in damaged.items())  # nothing cut
    caplog.clear()
    tier = DiskTier(folder, segment_bytes=SEGMENT_BYTES)
    assert tier.get("late").payload == b"written after the damage"
    assert_never_returned(tier, span.page_id)
    assert_reported(tier, caplog, segment, span)
    assert_others_intact(tier, span.page_id, *unwritten)
    assert tier.stats()["torn"] == 0
    tier.close()


@pytest.mark.parametrize("segment", [SEALED, ACTIVE], ids=["sealed", "active"])
@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("part", ["header", "body"])
def test_flipped_byte_is_reported_kept_and_never_returned(
    store: tuple[Path, dict[int, list[Span]]],
    caplog: pytest.LogCaptureFixture,
    part: str,
    position: str,
    segment: int,
) -> None:
    """The header flip hits the body length: a length that cannot be trusted any more."""
    folder, layout = store
    span = layout[segment][POSITIONS[position]]
    offset = (
        span.start + FIELDS["body length"] + 2 if part == "header" else (span.body + span.end) // 2
    )
    flip(segment_path(folder, segment), offset)
    check_damaged(folder, segment, span, files(folder), caplog)


@pytest.mark.parametrize(
    ("field", "mask"), [(f, 0x01) for f in FIELDS] + [("id length high byte", 0x80)]
)
def test_any_header_field_of_the_newest_record_is_corrupt_not_torn(
    store: tuple[Path, dict[int, list[Span]]],
    caplog: pytest.LogCaptureFixture,
    field: str,
    mask: int,
) -> None:
    """Every field of the last header in the file; the 0x80 flip makes the id seem to run
    past the end of the file, which only the header checksum can tell from a tear."""
    folder, layout = store
    span = layout[ACTIVE][-1]
    flip(segment_path(folder, ACTIVE), span.start + FIELDS[field], mask)
    check_damaged(folder, ACTIVE, span, files(folder), caplog)


@pytest.mark.parametrize("cut", ["fixed header", "id", "body"])
def test_torn_tail_is_cut_and_not_reported(
    store: tuple[Path, dict[int, list[Span]]], caplog: pytest.LogCaptureFixture, cut: str
) -> None:
    folder, layout = store
    span = layout[ACTIVE][-1]
    at = {"fixed header": span.start + 11, "id": span.start + HEADER_BYTES + 1}.get(
        cut, (span.body + span.end) // 2
    )
    path = segment_path(folder, ACTIVE)
    before = path.read_bytes()
    path.write_bytes(before[:at])
    tier = DiskTier(folder, segment_bytes=SEGMENT_BYTES)
    assert path.read_bytes() == before[: span.start]  # only the torn record went
    assert tier.stats()["torn"] == 1 and tier.stats()["corrupt"] == 0 and tier.verify() == []
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    assert span.page_id not in tier
    assert_others_intact(tier, span.page_id)
    tier.put(Page(id="late", payload=b"after the cut"))
    tier.close()
    tier = DiskTier(folder, segment_bytes=SEGMENT_BYTES)
    assert tier.get("late").payload == b"after the cut"
    assert tier.stats()["corrupt"] == 0 and tier.stats()["torn"] == 0
    assert_others_intact(tier, span.page_id)
    tier.close()


def test_truncated_sealed_segment_is_corrupt_not_torn(
    store: tuple[Path, dict[int, list[Span]]], caplog: pytest.LogCaptureFixture
) -> None:
    folder, layout = store
    span = layout[SEALED][-1]
    path = segment_path(folder, SEALED)
    path.write_bytes(path.read_bytes()[: (span.body + span.end) // 2])
    check_damaged(folder, SEALED, span, files(folder), caplog)


def test_torn_record_behind_damage_is_kept_and_the_segment_sealed(
    store: tuple[Path, dict[int, list[Span]]], caplog: pytest.LogCaptureFixture
) -> None:
    """A magic right behind damage may lie inside the damaged bytes, so it is not cut; the
    segment is sealed, or a later record would be read as the rest of the torn one."""
    folder, layout = store
    damaged, torn = layout[ACTIVE][-2], layout[ACTIVE][-1]
    path = segment_path(folder, ACTIVE)
    path.write_bytes(path.read_bytes()[: (torn.body + torn.end) // 2])
    flip(path, damaged.start + FIELDS["header checksum"])
    check_damaged(folder, ACTIVE, damaged, files(folder), caplog, (torn.page_id,))
    tier = DiskTier(folder, segment_bytes=SEGMENT_BYTES)
    assert torn.page_id not in tier and tier.stats()["segments"] == 3
    tier.close()


def test_compaction_quarantines_damage_and_keeps_bad_bodies_corrupt(
    store: tuple[Path, dict[int, list[Span]]], caplog: pytest.LogCaptureFixture
) -> None:
    folder, layout = store
    header, body = layout[SEALED][2], layout[ACTIVE][1]
    flip(segment_path(folder, SEALED), header.start + FIELDS["header checksum"])
    flip(segment_path(folder, ACTIVE), body.body + 7)
    damaged_bytes = segment_path(folder, SEALED).read_bytes()[
        header.start : layout[SEALED][3].start
    ]
    tier = DiskTier(folder, segment_bytes=SEGMENT_BYTES)
    tier.compact()
    assert tier.stats()["quarantined"] == 1
    (kept,) = (folder / "quarantine").glob("*.bin")
    assert kept.read_bytes() == damaged_bytes
    tier.close()
    tier = DiskTier(folder, segment_bytes=SEGMENT_BYTES)
    with pytest.raises(CorruptionError):
        tier.get(body.page_id)
    assert [d.page_id for d in tier.verify()] == [body.page_id]
    for i, page_id in enumerate(page_ids()):
        if page_id not in (header.page_id, body.page_id):
            assert tier.get(page_id).payload == payload(i)
    tier.close()
