"""Many writers on one folder: `Memory` objects and processes see each other's adds, updates
and deletes in every search mode at the next call, and the saved index never loses a record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memlayer import Memory
from memlayer.stores import records as records_module

EMBEDDER = "hash-1024"  # wide enough that the 120 writers' unique words rarely collide
WRITER = """
import json, random, sys
from memlayer import Memory
folder, name, count, embedder = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rng = random.Random(name)
kept, deleted = [], []
with Memory(path=folder, embedder=embedder) as memory:
    for i in range(count):
        rid = f"{name}-{i}"
        memory.add(f"{name}{i}x {name}{i}y {name}{i}z shared words", id=rid, metadata={"i": i})
        if i % 5 == 4:
            victim = kept.pop(rng.randrange(len(kept)))
            memory.delete(victim)
            deleted.append(victim)
        kept.append(rid)
print(json.dumps({"kept": kept, "deleted": deleted}))
"""


def _writer(folder: Path, name: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(folder), name, str(count), EMBEDDER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _assert_findable(memory: Memory, kept: list[str], deleted: list[str]) -> None:
    for rid in kept:
        name, i = rid.rsplit("-", 1)
        for mode in ("vector", "keyword"):
            hits = memory.search(f"{name}{i}x {name}{i}y {name}{i}z", k=1, mode=mode)
            assert hits and hits[0].id == rid, (mode, rid)
    everything = {h.id for h in memory.search("shared words", k=len(kept) + 10, mode="vector")}
    assert everything == set(kept)
    assert all(memory.get(rid) is None for rid in deleted)


def test_two_processes_write_concurrently_and_a_third_sees_everything(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    with Memory(path=folder, embedder=EMBEDDER) as watcher:  # opened before the writers start
        assert watcher.search("shared words", mode="vector") == []
        writers = [_writer(folder, name, 60) for name in ("a", "b")]
        results = []
        for child in writers:
            out, err = child.communicate(timeout=300)
            assert child.returncode == 0, err
            results.append(json.loads(out))
        kept = [rid for r in results for rid in r["kept"]]
        deleted = [rid for r in results for rid in r["deleted"]]
        assert len(kept) == 96 and len(deleted) == 24
        _assert_findable(watcher, kept, deleted)  # caught up without reopening
    reader = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from memlayer import Memory\n"
            "with Memory(path=sys.argv[1], embedder=sys.argv[2]) as m:\n"
            "    print(m.stats()['vectors'], m.stats()['records'])",
            str(folder),
            EMBEDDER,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert reader.stdout.split() == ["96", "96"], reader.stderr
    with Memory(path=folder, embedder=EMBEDDER) as third:
        _assert_findable(third, kept, deleted)


def test_two_memories_on_one_folder_lose_nothing_on_close(tmp_path: Path) -> None:
    """The reported hole: each adds a record and closes; the reopened index held 1 of 2."""
    folder = tmp_path / "m"
    first = Memory(path=folder, embedder=EMBEDDER)
    second = Memory(path=folder, embedder=EMBEDDER)
    first.add("alpha record from the first", id="one")
    second.add("beta record from the second", id="two")
    first.close()
    second.close()
    with Memory(path=folder, embedder=EMBEDDER) as memory:
        assert memory.stats()["vectors"] == 2
        assert memory.search("alpha first", k=1, mode="vector")[0].id == "one"
        assert memory.search("beta second", k=1, mode="vector")[0].id == "two"


def test_updates_and_deletes_from_another_object_show_at_the_next_call(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    with (
        Memory(path=folder, embedder=EMBEDDER) as mine,
        Memory(path=folder, embedder=EMBEDDER) as other,
    ):
        mine.add("the harbour opens at dawn", id="h")
        mine.add("the market closes at noon", id="m")
        assert mine.search("harbour dawn", k=1, mode="vector")[0].id == "h"
        other.update("h", text="quantum chromodynamics lecture notes")
        other.delete("m")
        for mode in ("vector", "keyword", "hybrid"):
            hits = mine.search("quantum chromodynamics", k=2, mode=mode)
            assert [h.id for h in hits] == ["h"], mode
            assert all(h.id != "m" for h in mine.search("market noon", k=5, mode=mode))
        assert mine.stats()["vectors"] == 1


def test_a_saved_index_is_stamped_with_what_it_reflects(tmp_path: Path) -> None:
    """An index saved while another writer's records were unseen must not claim them."""
    folder = tmp_path / "m"
    crashing_writer = (
        "import os, sys\n"
        "from memlayer import Memory\n"
        "memory = Memory(path=sys.argv[1], embedder=sys.argv[2])\n"
        "memory.add('written behind the first memory', id='b')\n"
        "os._exit(0)  # dies without saving its index\n"
    )
    with Memory(path=folder, embedder=EMBEDDER) as first:
        first.add("seen by the first memory", id="a")
        first.flush()
        subprocess.run(
            [sys.executable, "-c", crashing_writer, str(folder), EMBEDDER], check=True, timeout=120
        )
        first.add("a third record", id="c")
    with Memory(path=folder, embedder=EMBEDDER) as memory:
        assert memory.search("behind the first memory", k=1, mode="vector")[0].id == "b"
        assert memory.stats()["vectors"] == 3


def test_a_memory_behind_a_pruned_log_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(records_module, "LOG_KEEP", 2)
    folder = tmp_path / "m"
    with Memory(path=folder, embedder=EMBEDDER) as lagging:
        lagging.add("the first record", id="r0")
        with Memory(path=folder, embedder=EMBEDDER) as busy:
            for i in range(1, 8):
                busy.add(f"record number {i} from the busy writer", id=f"r{i}")
            busy.delete("r0")
        # busy saved at sequence 9 and pruned the log up to 7; lagging reflects 1
        assert lagging._records.changes_since(lagging._retriever._vectors._mirror.applied) is None
        hits = lagging.search("record busy writer", k=10, mode="vector")
        assert {h.id for h in hits} == {f"r{i}" for i in range(1, 8)}
        assert lagging.stats()["vectors"] == 7


def test_a_save_clears_what_a_killed_saver_left(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    with Memory(path=folder, embedder=EMBEDDER) as memory:
        memory.add("first", id="a")
        (folder / "vectors.idx.k1ll3d.tmp").write_bytes(b"half a save")
        memory.add("second", id="b")
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".tmp") == []
    with Memory(path=folder, embedder=EMBEDDER) as memory:
        assert memory.stats()["vectors"] == 2
