"""Group commit on SQLite: appends that queue while another commits go in one transaction,
each writer returns once its own batch is committed, and a bad batch fails only its writer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memlayer import Memory
from memlayer.group_commit import GroupCommit


def _thread(errors: list[BaseException], call: Callable[..., Any], *args: Any, **kwargs: Any):
    """A thread running `call`, whatever it raises collected in `errors`."""

    def run() -> None:
        try:
            call(*args, **kwargs)
        except BaseException as exc:
            errors.append(exc)

    return threading.Thread(target=run)


def _queue_while_locked(
    lock: threading.RLock, group: GroupCommit, work: list[threading.Thread]
) -> None:
    """Start `work` while `lock` is held, wait until every thread queued, then let go."""
    with lock:
        for thread in work:
            thread.start()
        deadline = time.monotonic() + 10
        while len(group._queue) < len(work) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(group._queue) == len(work)
    for thread in work:
        thread.join()


def test_batches_queued_during_a_commit_share_the_next_transaction() -> None:
    lock = threading.RLock()
    committed: list[list[int]] = []
    group = GroupCommit(committed.append, lock)
    work = [threading.Thread(target=group.submit, args=(n,)) for n in range(6)]
    _queue_while_locked(lock, group, work)
    assert group.transactions == 1
    assert sorted(committed[0]) == list(range(6))


def test_a_failing_batch_fails_only_its_writer() -> None:
    lock = threading.RLock()
    committed: list[int] = []

    def commit(batches: list[int]) -> None:
        if 3 in batches:
            raise ValueError("batch 3 is bad")
        committed.extend(batches)

    group = GroupCommit(commit, lock)
    errors: dict[int, BaseException] = {}

    def writer(n: int) -> None:
        try:
            group.submit(n)
        except ValueError as exc:
            errors[n] = exc

    _queue_while_locked(lock, group, [threading.Thread(target=writer, args=(n,)) for n in range(6)])
    assert sorted(committed) == [0, 1, 2, 4, 5]
    assert list(errors) == [3]


def test_concurrent_adds_commit_together_and_all_survive_reopen(tmp_path: Path) -> None:
    folder = tmp_path / "memory"
    with Memory(folder, embedder="hash") as memory:
        errors: list[BaseException] = []
        writers = [
            _thread(
                errors,
                memory.add_many,
                [{"id": f"w{n}-{i}", "text": f"writer {n} note {i}"} for i in range(5)],
                user_id=f"u{n}",
            )
            for n in range(8)
        ]
        _queue_while_locked(memory._lock, memory._group_commit, writers)
        assert errors == []
        assert memory._group_commit.transactions == 1
        assert memory.count() == 40
    with Memory(folder, embedder="hash") as memory:
        assert memory.count() == 40
        hits = memory.search("writer 5 note 3", k=1, user_id="u5", mode="vector")
        assert hits[0].id == "w5-3"


@pytest.mark.parametrize("order", ["first", "second"])
def test_one_id_written_twice_in_one_transaction_keeps_the_later_write(
    tmp_path: Path, order: str
) -> None:
    with Memory(tmp_path / "memory", embedder="hash") as memory:
        texts = ["the red kite", "the blue heron"]
        if order == "second":
            texts.reverse()
        errors: list[BaseException] = []
        # queued in this order: the second write is the later one
        writers = [_thread(errors, memory.add, text, id="bird") for text in texts]
        with memory._lock:
            for writer in writers:
                writer.start()
                deadline = time.monotonic() + 10
                while len(memory._group_commit._queue) < len(writers[: writers.index(writer) + 1]):
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
        for writer in writers:
            writer.join()
        assert errors == []
        assert memory._group_commit.transactions == 1
        assert memory.get("bird").text == texts[1]
        assert memory.count() == 1
        assert memory._retriever.vectors() == 1
        assert memory.search(texts[1], k=1, mode="vector")[0].id == "bird"
