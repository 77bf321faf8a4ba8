"""Vector index over record rowids (FAISS, inner product on unit vectors).

Exact (flat) while small; past `approx_threshold` vectors it trains an inverted-file index
(IVF, exact vectors in each list) and retrains as the collection quadruples. Filtered searches
return the top-k of the allowed ids (all of them when fewer are stored): small allowed sets are
scored by brute force, larger ones through FAISS with an id selector; on the IVF path the probe
is widened by the filter's selectivity and then doubled until more lists stop changing the
answer. Saved as one checksummed file so a torn write is detected and the index rebuilt from
the database. With FAISS's GPU build and a GPU (`IndexConfig.device`), unfiltered top-k
searches run on a GPU copy of the index (`faiss_device`); everything else stays on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memlayer.errors import CorruptionError, InvalidInputError
from memlayer.optional import require_faiss
from memlayer.retrievers import faiss_device
from memlayer.threads import faiss_threads

_MAGIC = b"MLVIDX02"
# A flat search of fewer queries runs on the calling thread alone: FAISS scans a few queries
# one per thread, so more threads add no speed, only a team that waits at its barrier for a
# core to come free (12.6 against 1.5 ms p50 for one query over 10,000 vectors on a 2-core
# VM with one core busy; RESULTS.md). FAISS multiplies by BLAS from 20 queries up.
SERIAL_BELOW = 20
_HEADER = struct.Struct("<8sqQI")  # magic, applied_seq, payload length, crc32
_FILTER_KEY = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


@dataclass
class IndexConfig:
    """Tuning of the vector index."""

    approx_threshold: int = 50_000  # flat (exact) below this many vectors, IVF above
    nprobe_fraction: float = 1 / 64  # inverted lists probed per query, as a fraction of nlist
    min_nprobe: int = 24
    brute_force_below: int = 5_000  # filtered searches over fewer allowed ids use a matmul
    settle_rounds: int = 2  # filtered IVF search stops after this many doublings add no hit
    train_sample: int = 100_000
    # FAISS OpenMP threads for adds and searches, on whichever thread calls (None: FAISS's
    # default); a flat search of fewer than SERIAL_BELOW queries always runs on one
    threads: int | None = None
    # where unfiltered top-k searches run: "auto" (a GPU when FAISS's GPU build sees one),
    # "cpu", "cuda" / "cuda:N" (an error when FAISS cannot search there); see faiss_device
    device: str = "auto"
    # PostgreSQL (pgvector HNSW, cosine): graph degree, build and search breadth
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 100
    # a filtered PostgreSQL search the planner expects to match at most this many records
    # ranks them exactly (no index); HNSW otherwise, exactly if HNSW finds fewer than k.
    # Measured at 1M records under a 1% filter (10,000 matches): exact 37 ms, recall 1.0;
    # HNSW with pgvector 0.8's iterative scan 41 ms, recall 0.61 (RESULTS.md)
    pg_exact_below: int = 20_000
    # maintenance_work_mem for building the HNSW index (None: the server's setting); a graph
    # that outgrows it is built far slower
    pg_build_memory_mb: int | None = 1024
    # metadata keys (dotted paths) whose equality filters PostgreSQL ranks from a covering
    # index of their own: the matching records' vectors are read from the index, not from
    # rows scattered over the table (1M records, a 1% filter: 6 against 14 ms in SQL)
    pg_filter_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        faiss_device.check_device(self.device)
        if isinstance(self.pg_filter_keys, str):
            raise InvalidInputError(
                "pg_filter_keys",
                "must be a sequence of key paths, not one string",
                self.pg_filter_keys,
            )
        self.pg_filter_keys = tuple(self.pg_filter_keys)
        for key in self.pg_filter_keys:
            if not isinstance(key, str) or not _FILTER_KEY.fullmatch(key):
                raise InvalidInputError(
                    "pg_filter_keys",
                    "each must be a metadata key path of [A-Za-z0-9_] words joined by dots",
                    key,
                )


class VectorIndex:
    """Upsertable id → unit vector map with top-k and exact-k filtered search."""

    def __init__(self, dim: int, config: IndexConfig | None = None, *, _index: Any = None):
        if dim < 1:
            raise InvalidInputError("dim", "must be at least 1", dim)
        self.dim = dim
        self.config = config or IndexConfig()
        self._gpu = faiss_device.gpu_for(_faiss(), self.config.device)  # None: the CPU
        self._gpu_copy: faiss_device.GpuCopy | None = None  # made at the first search
        self._index = _index if _index is not None else _flat(dim)
        self._ids: set[int] = set(_stored_ids(self._index).tolist())
        self._sorted_ids: np.ndarray | None = None  # self._ids as a sorted array, until changed
        self._trained_at = len(self._ids) if self.approximate else 0

    @property
    def on_gpu(self) -> bool:
        """True when unfiltered top-k searches run on a GPU."""
        return self._gpu is not None

    @property
    def approximate(self) -> bool:
        """True once the index is an IVF (approximate for unfiltered top-k)."""
        return _is_ivf(self._index)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, rowid: object) -> bool:
        return isinstance(rowid, (int, np.integer)) and int(rowid) in self._ids

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace vectors by id; all-zero or non-finite vectors are refused."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = _storable(self._check(vectors, "vectors"))
        if len(ids) != len(vectors):
            raise InvalidInputError("ids", "must have one id per vector", (len(ids), len(vectors)))
        if len(np.unique(ids)) != len(ids):
            raise InvalidInputError("ids", "must not repeat within one call")
        if len(ids) == 0:
            return
        self.remove(ids)
        with faiss_threads(self.config.threads):
            self._index.add_with_ids(vectors, ids)
            if self._gpu_copy is not None:
                self._gpu_copy.add(vectors, ids)
            self._ids.update(ids.tolist())
            self._sorted_ids = None
            self._maybe_retrain()

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids (unknown ids are ignored)."""
        faiss = _faiss()

        wanted = np.asarray(ids, dtype=np.int64).tolist()
        known = np.asarray([i for i in wanted if i in self._ids], dtype=np.int64)
        if len(known):
            # IVF's hashtable direct map removes only through an IDSelectorArray
            self._index.remove_ids(faiss.IDSelectorArray(len(known), faiss.swig_ptr(known)))
            self._gpu_copy = None  # FAISS's GPU indexes cannot remove: copied again on search
            self._ids.difference_update(known.tolist())
            self._sorted_ids = None

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query, best first, padded with (-inf, -1)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError("k", "must be an integer >= 1", k)
        queries = self._check(queries, "queries")
        if allowed is None:
            scores, ids = self._search(queries, k, None, self._nprobe())
        else:
            present = self._present(np.asarray(allowed, dtype=np.int64))
            if len(present) == 0 or len(present) <= self.config.brute_force_below:
                return self._brute_force(queries, k, present)
            with faiss_threads(self.config.threads):
                scores, ids = self._filtered(queries, k, present)
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids.astype(np.int64)

    def _search(
        self, queries: np.ndarray, k: int, selector: Any, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()

        if selector is None and self._searches_on_gpu(k, nprobe):
            assert self._gpu is not None
            if self._gpu_copy is None:
                self._gpu_copy = faiss_device.GpuCopy(faiss, self._index, self._gpu)
            return self._gpu_copy.search(queries, k, nprobe)
        if self.approximate:
            params: Any = faiss.SearchParametersIVF(nprobe=nprobe)
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        serial = not self.approximate and len(queries) < SERIAL_BELOW
        with faiss_threads(1 if serial else self.config.threads):
            return self._index.search(queries, k, params=params)

    def _searches_on_gpu(self, k: int, nprobe: int) -> bool:
        """Whether an unfiltered search of this k and nprobe runs on the GPU copy."""
        if self._gpu is None or len(self._ids) == 0 or max(k, nprobe) > faiss_device.GPU_MAX_K:
            return False
        return faiss_device.supported(_faiss(), self._index)

    def _filtered(
        self, queries: np.ndarray, k: int, present: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among `present` through FAISS.

        The flat index is scanned once with the id selector (exact); the IVF is probed in
        widening rounds until the answer settles.
        """
        selector = _selector(present)
        if not self.approximate:
            return self._search(queries, k, selector, 1)
        return self._probe_until_settled(queries, k, present, selector)

    def _probe_until_settled(
        self, queries: np.ndarray, k: int, present: np.ndarray, selector: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Filtered IVF search that keeps probing until more lists stop changing the answer.

        Lists are scanned in order of centroid score, in rounds that double the lists probed.
        The first round is the unfiltered probe widened by the filter's selectivity (a 10%
        filter probes 10x the lists), so it meets about as many allowed vectors as an
        unfiltered search meets vectors. A query is settled once it holds min(k, allowed)
        hits and `settle_rounds` rounds in a row added none of them, so the lists probed have
        quadrupled (at the default 2) since its answer last changed; or once every allowed id
        is in hand, or every list is probed. One quiet round is not enough: on uniform data
        the second round sometimes adds nothing by chance and a query stopped there keeps
        1 of its 10. At worst this scans every list: one membership test per stored id and
        one inner product per allowed id, the cost of exact filtered search.
        """
        nlist = self._nlist()
        order = self._index.quantizer.search(queries, nlist)[1]
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        want = min(k, len(present))
        start, stop = 0, min(nlist, math.ceil(self._nprobe() * len(self) / len(present)))
        active = np.arange(len(queries))
        quiet = np.zeros(len(queries), dtype=np.int64)  # rounds in a row that added no hit
        while len(active):
            found = self._scan_lists(queries[active], k, order[active, start:stop], selector)
            merged_scores, merged_ids, took = _merge_top(scores[active], ids[active], *found)
            scores[active], ids[active] = merged_scores, merged_ids
            held = (merged_ids >= 0).sum(axis=1)
            quiet[active] = np.where((held >= want) & ~took, quiet[active] + 1, 0)
            settled = quiet[active] >= self.config.settle_rounds
            done = settled | (held == len(present)) | (stop == nlist)
            active = active[~done]
            start, stop = stop, min(nlist, 2 * stop)
        return scores, ids

    def _scan_lists(
        self, queries: np.ndarray, k: int, lists: np.ndarray, selector: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k allowed (scores, ids) per query within the given inverted lists only."""
        faiss = _faiss()

        lists = np.ascontiguousarray(lists, dtype=np.int64)
        params = faiss.SearchParametersIVF(nprobe=lists.shape[1])
        params.sel = selector
        coarse = np.zeros(lists.shape, dtype=np.float32)  # IVFFlat scans ignore these
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        self._index.search_preassigned_c(
            len(queries),
            faiss.swig_ptr(queries),
            k,
            faiss.swig_ptr(lists),
            faiss.swig_ptr(coarse),
            faiss.swig_ptr(scores),
            faiss.swig_ptr(ids),
            False,
            params,
        )
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids

    def _brute_force(
        self, queries: np.ndarray, k: int, present: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if len(present) == 0:
            return scores, ids
        sims = queries @ self._index.reconstruct_batch(present).T
        take = min(k, len(present))
        top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        for row in range(len(queries)):
            order = top[row][np.argsort(-sims[row, top[row]], kind="stable")]
            scores[row, :take] = sims[row, order]
            ids[row, :take] = present[order]
        return scores, ids

    def _present(self, allowed: np.ndarray) -> np.ndarray:
        """The distinct allowed ids that are stored.

        A small allowed set is intersected with the id set (cost grows with the allowed set
        only); a large one is matched in one vectorised pass against the stored ids as a
        sorted array, which is kept until the next add or remove.
        """
        if 8 * len(allowed) < len(self._ids):
            common = self._ids.intersection(allowed.tolist())
            return np.fromiter(common, dtype=np.int64, count=len(common))
        if self._sorted_ids is None:
            self._sorted_ids = np.sort(np.fromiter(self._ids, dtype=np.int64, count=len(self)))
        wanted = _distinct(allowed)
        if len(self._sorted_ids) == 0:
            return wanted[:0]
        at = np.searchsorted(self._sorted_ids, wanted).clip(max=len(self._sorted_ids) - 1)
        return wanted[self._sorted_ids[at] == wanted]

    def _nlist(self) -> int:
        return int(self._index.nlist) if self.approximate else 1

    def _nprobe(self) -> int:
        if not self.approximate:
            return 1
        wanted = max(self.config.min_nprobe, round(self._nlist() * self.config.nprobe_fraction))
        return min(self._nlist(), wanted)

    def _maybe_retrain(self) -> None:
        size = len(self._ids)
        if size < self.config.approx_threshold:
            return
        if self.approximate and size < 4 * self._trained_at:
            return
        self._index = self._train_ivf()
        self._gpu_copy = None
        self._trained_at = size

    def _train_ivf(self) -> Any:
        faiss = _faiss()

        ids = np.fromiter(self._ids, dtype=np.int64, count=len(self._ids))
        ids.sort()
        vectors = self._index.reconstruct_batch(ids)
        nlist = int(min(65_536, max(64, 4 * math.sqrt(len(ids)))))
        rng = np.random.default_rng(0)
        sample = vectors[
            rng.choice(len(ids), size=min(len(ids), self.config.train_sample), replace=False)
        ]
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.add_with_ids(vectors, ids)
        return index

    def _check(self, vectors: np.ndarray, field: str) -> np.ndarray:
        array = np.ascontiguousarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise InvalidInputError(field, f"must have shape (n, {self.dim})", array.shape)
        return array

    def save(self, path: Path, applied_seq: int) -> None:
        """Write atomically with the database seq it reflects, safe against concurrent saves.

        The CPU index is what is saved (a GPU copy is only ever a copy of it), so a saved
        index loads on any machine, with or without a GPU.

        Each save writes a temporary file of its own (unique name, same folder), fsyncs it,
        renames it over `path` and fsyncs the folder: a reader, or another saver, only ever
        sees a whole file, the previous one or one of the new ones.
        """
        faiss = _faiss()

        payload = faiss.serialize_index(self._index).tobytes()
        header = _HEADER.pack(_MAGIC, applied_seq, len(payload), zlib.crc32(payload))
        _write_atomically(Path(path), header, payload)

    @classmethod
    def load(cls, path: Path, config: IndexConfig | None = None) -> tuple[VectorIndex, int]:
        """Read an index saved by `save`; CorruptionError when the file is damaged."""
        faiss = _faiss()

        data = Path(path).read_bytes()
        if len(data) < _HEADER.size:
            raise CorruptionError(f"vector index {path} is truncated")
        magic, applied_seq, length, crc = _HEADER.unpack_from(data)
        payload = data[_HEADER.size :]
        if magic != _MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            raise CorruptionError(f"vector index {path} failed its checksum")
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        if _is_ivf(index):
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return cls(index.d, config, _index=index), int(applied_seq)


def check_device_available(config: IndexConfig) -> None:
    """Raise now, before anything is opened, when `config.device` names a GPU that FAISS
    cannot search on (the error `VectorIndex` would raise)."""
    if config.device.startswith("cuda"):
        faiss_device.gpu_for(_faiss(), config.device)


def _faiss() -> Any:
    """FAISS, imported on first use (its type stubs lag its API, hence Any)."""
    return require_faiss()


def _flat(dim: int) -> Any:
    faiss = _faiss()

    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _is_ivf(index: Any) -> bool:
    return hasattr(index, "nlist")


def _stored_ids(index: Any) -> np.ndarray:
    faiss = _faiss()

    if not _is_ivf(index):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    invlists = index.invlists
    parts = [
        faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
        for i in range(index.nlist)
        if invlists.list_size(i)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _storable(vectors: np.ndarray) -> np.ndarray:
    """`vectors` unchanged, or InvalidInputError naming the first row no search could rank.

    A NaN or infinite component makes every inner product with it meaningless, and an
    all-zero vector has no direction (it scores 0 against every query).
    """
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise InvalidInputError("vectors", "must be finite (no NaN or inf)", f"row {bad[0]}")
    zero = np.flatnonzero(~vectors.any(axis=1))
    if len(zero):
        raise InvalidInputError("vectors", "must not be all zeros", f"row {zero[0]}")
    return vectors


def _distinct(ids: np.ndarray) -> np.ndarray:
    """Sorted distinct ids (a sort and a neighbour compare: faster than np.unique here)."""
    ordered = np.sort(ids)
    if len(ordered) == 0:
        return ordered
    return ordered[np.concatenate([[True], ordered[1:] != ordered[:-1]])]


def _selector(present: np.ndarray) -> Any:
    """A FAISS id selector for `present`: a bitmap when the ids are dense, else a hash set.

    A bitmap is built with one numpy pass and tested with one bit lookup, where a hash set
    of 200K ids takes tens of milliseconds to build; it is used while it is no larger than
    the id array itself would be (ids below 64 per allowed id).
    """
    faiss = _faiss()

    if len(present) and present.min() >= 0 and present.max() < 64 * len(present):
        members = np.zeros(int(present.max()) + 1, dtype=bool)
        members[present] = True
        bits = np.packbits(members, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
        selector.bits = bits  # FAISS reads the bitmap in place: keep it alive
        return selector
    return faiss.IDSelectorBatch(present)


def _merge_top(
    scores: np.ndarray, ids: np.ndarray, more_scores: np.ndarray, more_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best k of two disjoint per-query candidate sets, and which queries took a new one."""
    k = scores.shape[1]
    all_scores = np.concatenate([scores, more_scores], axis=1)
    all_ids = np.concatenate([ids, more_ids], axis=1)
    top = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    top_ids = np.take_along_axis(all_ids, top, axis=1)
    took = ((top >= k) & (top_ids >= 0)).any(axis=1)
    return np.take_along_axis(all_scores, top, axis=1), top_ids, took


def _write_atomically(path: Path, *chunks: bytes) -> None:
    """Replace `path` by `chunks` through a uniquely named, fsync'ed temporary file.

    A shared temporary name would let two writers interleave their bytes in one file, or
    rename it from under each other; on any failure the temporary file is removed.
    """
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
