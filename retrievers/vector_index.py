"""Vector index over record rowids (FAISS, inner product on unit vectors).

Exact and exact-k: a filtered search returns exactly min(k, |allowed ∩ stored|) ids, scoring
small allowed sets by brute force and larger ones through FAISS with an id selector. Saved as
one checksummed file so a torn write is detected and the index rebuilt from the database.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memlayer.errors import CorruptionError, InvalidInputError

_MAGIC = b"MLVIDX01"
_HEADER = struct.Struct("<8sqQI")  # magic, applied_seq, payload length, crc32


@dataclass
class IndexConfig:
    """Tuning of the vector index."""

    brute_force_below: int = 50_000  # filtered searches over fewer allowed ids use a matmul
    threads: int | None = None  # FAISS OpenMP threads; None keeps FAISS's default


class VectorIndex:
    """Upsertable id → unit vector map with exact (filtered) top-k search."""

    def __init__(self, dim: int, config: IndexConfig | None = None, *, _index: Any = None):
        import faiss

        if dim < 1:
            raise InvalidInputError("dim", "must be at least 1", dim)
        self.dim = dim
        self.config = config or IndexConfig()
        if self.config.threads:
            faiss.omp_set_num_threads(self.config.threads)
        self._index = _index if _index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __contains__(self, rowid: object) -> bool:
        if not isinstance(rowid, (int, np.integer)):
            return False
        try:
            self._index.reconstruct(int(rowid))
        except RuntimeError:
            return False
        return True

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace vectors by id."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = self._check(vectors, "vectors")
        if len(ids) != len(vectors):
            raise InvalidInputError("ids", "must have one id per vector", (len(ids), len(vectors)))
        if len(ids) == 0:
            return
        self.remove(ids)
        self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids (unknown ids are ignored)."""
        import faiss

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) and self._index.ntotal:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query, best first, padded with (-inf, -1)."""
        import faiss

        if k < 1:
            raise InvalidInputError("k", "must be at least 1", k)
        queries = self._check(queries, "queries")
        if allowed is not None:
            allowed = np.ascontiguousarray(allowed, dtype=np.int64)
            if len(allowed) <= self.config.brute_force_below:
                return self._brute_force(queries, k, allowed)
            selector = faiss.IDSelectorBatch(allowed)
            params = faiss.SearchParameters()
            params.sel = selector
            scores, ids = self._index.search(queries, k, params=params)
        else:
            scores, ids = self._index.search(queries, k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    def _brute_force(
        self, queries: np.ndarray, k: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        present = self._present(allowed)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if len(present) == 0:
            return scores, ids
        vectors = self._index.reconstruct_batch(present)
        sims = queries @ vectors.T
        take = min(k, len(present))
        top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        for row in range(len(queries)):
            order = top[row][np.argsort(-sims[row, top[row]], kind="stable")]
            scores[row, :take] = sims[row, order]
            ids[row, :take] = present[order]
        return scores, ids

    def _present(self, allowed: np.ndarray) -> np.ndarray:
        import faiss

        stored = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        return np.intersect1d(allowed, stored)

    def _check(self, vectors: np.ndarray, field: str) -> np.ndarray:
        array = np.ascontiguousarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise InvalidInputError(field, f"must have shape (n, {self.dim})", array.shape)
        return array

    def save(self, path: Path, applied_seq: int) -> None:
        """Write atomically (temp file, fsync, rename) with the database seq it reflects."""
        import faiss

        payload = faiss.serialize_index(self._index).tobytes()
        header = _HEADER.pack(_MAGIC, applied_seq, len(payload), zlib.crc32(payload))
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(header)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path, config: IndexConfig | None = None) -> tuple[VectorIndex, int]:
        """Read an index saved by `save`; CorruptionError when the file is damaged."""
        import faiss

        data = Path(path).read_bytes()
        if len(data) < _HEADER.size:
            raise CorruptionError(f"vector index {path} is truncated")
        magic, applied_seq, length, crc = _HEADER.unpack_from(data)
        payload = data[_HEADER.size :]
        if magic != _MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            raise CorruptionError(f"vector index {path} failed its checksum")
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        return cls(index.d, config, _index=index), int(applied_seq)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
