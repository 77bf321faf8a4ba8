"""The vector index as a mirror of the records table, shared safely by many writers.

The records table is the truth; each `Memory` keeps the vectors in RAM and knows the write
sequence number they reflect (`applied`). Before a vector search it catches up from the
table's change log (rows added, updated or deleted by any process since `applied`), so a
write made through another `Memory` object or process is visible at the next call. The
index is saved stamped with the sequence it really reflects, under a lock file so savers
queue, into a fresh temporary file renamed over the old one, so no reader sees a torn file.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from memlayer.errors import CorruptionError
from memlayer.retrievers.vector_index import IndexConfig, VectorIndex
from memlayer.stores.records import RecordStore

log = logging.getLogger(__name__)


class IndexMirror:
    """A `VectorIndex` of a `RecordStore`'s embeddings and the sequence number it reflects."""

    def __init__(
        self, records: RecordStore, dim: int, path: Path | None, config: IndexConfig
    ) -> None:
        self._records = records
        self._dim = dim
        self._path = path
        self._config = config
        self._changed = False  # the index moved since it was loaded or saved
        self.index, self.applied = self._load()

    def _load(self) -> tuple[VectorIndex, int]:
        """The saved index brought up to date, or one rebuilt from the table."""
        if self._path is not None and self._path.exists():
            try:
                index, applied = VectorIndex.load(self._path, self._config)
            except CorruptionError as exc:
                log.warning("%s: rebuilding from the database", exc)
            else:
                if index.dim == self._dim and applied <= self._records.seq():
                    self.index, self.applied = index, applied
                    if self.catch_up():
                        return self.index, self.applied
                log.info("vector index %s cannot catch up: rebuilding", self._path)
        return self._rebuild()

    def _rebuild(self) -> tuple[VectorIndex, int]:
        self._changed = True
        index = VectorIndex(self._dim, self._config)
        seq, batches = self._records.snapshot()
        for rowids, vectors in batches:
            keep = _searchable(rowids, vectors)
            index.add(rowids[keep], vectors[keep])
        return index, seq

    def catch_up(self) -> bool:
        """Apply every write committed since `applied`; False when the log no longer reaches
        back that far (the caller rebuilds)."""
        changes = self._records.changes_since(self.applied)
        if changes is None:
            return False
        if changes.seq != self.applied:
            self.index.remove(changes.gone)
            if len(changes.rowids):
                keep = _searchable(changes.rowids, changes.vectors)
                self.index.remove(changes.rowids[~keep])
                self.index.add(changes.rowids[keep], changes.vectors[keep])
            self.applied = changes.seq
            self._changed = True
        return True

    def refresh(self) -> None:
        """Catch up, rebuilding when the change log was pruned past `applied`."""
        if not self.catch_up():
            self.index, self.applied = self._rebuild()

    def wrote(self, seq: int, rowids: np.ndarray, vectors: np.ndarray | None) -> None:
        """Apply this process's own write of sequence `seq` (vectors None: a delete).

        `applied` advances only when no other writer's sequence lies in between; those are
        fetched by the next catch-up, which re-applies this write harmlessly.
        """
        if vectors is None:
            self.index.remove(rowids)
        else:
            self.index.add(rowids, vectors)
        self._changed = True
        if seq == self.applied + 1:
            self.applied = seq

    @property
    def dirty(self) -> bool:
        """True when the index moved since it was loaded or last saved."""
        return self._path is not None and self._changed

    def save(self) -> None:
        """Catch up, then save atomically, stamped with the sequence the index reflects."""
        if self._path is None:
            return
        self.refresh()
        with _locked(self._path.with_name(self._path.name + ".lock")):
            for stale in self._path.parent.glob(f"{self._path.name}.*.tmp"):
                stale.unlink(missing_ok=True)  # left by a saver killed mid-save
            self.index.save(self._path, self.applied)
        self._changed = False
        self._records.prune_log(self.applied)


def _searchable(rowids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Mask of the rows whose stored vector can be indexed. Releases before 0.2.0 stored an
    all-zero vector for a text its embedder could not place; such a record stays readable
    and keyword-searchable, and is left out of vector search."""
    keep = np.isfinite(vectors).all(axis=1) & np.any(vectors, axis=1)
    if not keep.all():
        log.warning(
            "%d records have an all-zero or non-finite embedding (rowids %s): "
            "left out of vector search",
            int((~keep).sum()),
            rowids[~keep][:10].tolist(),
        )
    return keep


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), held for the block."""
    try:
        import fcntl
    except ImportError:  # Windows: os.replace alone keeps the file whole
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
