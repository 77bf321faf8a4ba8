"""Group commit: writes that arrive while another commits go together in the next transaction.

SQLite admits one writer and each commit waits for its fsync, so writers of many threads
(the HTTP service's appends) queue and pay one fsync each. Here a writer queues its batch;
whoever holds the commit lock (the leader) takes every queued batch and commits them in one
transaction, then wakes their writers. A writer returns only once its batch is committed,
so an acknowledged write is as durable as before. When a joint commit fails, each batch is
committed alone, so one writer's bad batch fails only that writer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Queued(Generic[T]):
    """One writer's batch and how its commit ended."""

    def __init__(self, batch: T) -> None:
        self.batch = batch
        self.done = False
        self.error: BaseException | None = None


class GroupCommit(Generic[T]):
    """Commits batches through `commit(batches)` (one transaction for all of them), joining
    those that queue while `lock` is held by an earlier commit."""

    def __init__(self, commit: Callable[[list[T]], None], lock: threading.RLock) -> None:
        self._commit = commit
        self._lock = lock
        self._queue: list[_Queued[T]] = []
        self._queue_lock = threading.Lock()
        self.transactions = 0  # commits run (each for one or more batches)

    def submit(self, batch: T) -> None:
        """Commit `batch`, possibly together with other writers' batches; raise what its
        commit raised."""
        mine = _Queued(batch)
        with self._queue_lock:
            self._queue.append(mine)
        with self._lock:
            if not mine.done:  # no leader took it yet: lead, for every batch queued so far
                with self._queue_lock:
                    taken, self._queue = self._queue, []
                self._run(taken)
        if mine.error is not None:
            raise mine.error

    def _run(self, taken: list[_Queued[T]]) -> None:
        self.transactions += 1
        try:
            self._commit([queued.batch for queued in taken])
        except Exception as error:
            if len(taken) > 1:  # find whose batch failed: each alone
                for queued in taken:
                    self._run([queued])
                return
            taken[0].error = error
        except BaseException as error:  # interrupted: no batch taken may look committed
            for queued in taken:
                queued.error, queued.done = error, True
            raise
        for queued in taken:
            queued.done = True
