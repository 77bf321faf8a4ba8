"""Semantic memory benchmark: memlayer vs an embedded peer (Chroma, LanceDB), side by side.

Sizes: 10K records of real text with real MiniLM embeddings (memlayer's `Memory` end to end:
SQL + FTS + vector index), and 100K / 1M precomputed unit vectors drawn around random
centres so they cluster like real embeddings (memlayer's `VectorIndex`). Every system gets
the same vectors, so embedding time is excluded for all. Reports add throughput, search
p50/p95 (k=10, one query at a time), recall@10 against exact search, disk and RAM.

    python benchmarks/memory_bench.py --sizes 10k 100k 1m --peers chroma lancedb
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DIM = 384
K = 10
SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}


@dataclass
class Row:
    size: str
    system: str
    add_per_s: float
    p50_ms: float
    p95_ms: float
    recall_at_10: float
    disk_mb: float
    ram_mb: float
    build_s: float


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
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def real_corpus(n: int) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """n chunks of the Python stdlib docs and 200 held-out chunks as queries, MiniLM-embedded."""
    from memlayer.chunking import chunk_stream
    from memlayer.demo_corpus import DEMO_MODULES, stdlib_docs
    from memlayer.embedders import MiniLMEmbedder

    texts: list[str] = []
    for _, doc in stdlib_docs(DEMO_MODULES):
        texts.extend(chunk_stream([doc], chunk_tokens=40, overlap=8))
    rng = np.random.default_rng(0)
    picked = rng.permutation(len(texts))
    if len(picked) < n + 200:
        raise SystemExit(f"only {len(picked)} chunks in the corpus, {n + 200} needed")
    docs = [texts[i] for i in picked[:n]]
    queries = [texts[i] for i in picked[n : n + 200]]
    embedder = MiniLMEmbedder()
    started = time.perf_counter()
    doc_vectors = embedder.embed(docs)
    print(f"  embedded {n} chunks with MiniLM in {time.perf_counter() - started:.0f} s")
    return docs, doc_vectors, queries, embedder.embed(queries)


def exact_topk(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    out = np.empty((len(queries), K), dtype=np.int64)
    for start in range(0, len(queries), 64):
        sims = queries[start : start + 64] @ data.T
        top = np.argpartition(-sims, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[start : start + 64] = np.take_along_axis(top, order, axis=1)
    return out


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)])
    )


def disk_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed_queries(
    search: Callable[[np.ndarray], list[int]], queries: np.ndarray
) -> tuple[list[list[int]], float, float]:
    for query in queries[:5]:
        search(query)
    found, times = [], []
    for query in queries:
        started = time.perf_counter()
        found.append(search(query))
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return found, statistics.median(times), times[int(0.95 * (len(times) - 1))]


def bench_memlayer_memory(
    label: str,
    docs: list[str],
    vectors: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    root: Path,
) -> Row:
    """memlayer.Memory end to end (SQL records + FTS + vector index), vector mode."""
    from memlayer import Memory

    lookup = {text: i for i, text in enumerate(docs)}
    query_box: dict[str, np.ndarray] = {}

    def table_embedder(texts: list[str]) -> np.ndarray:
        return np.stack(
            [
                query_box[t]
                if t in query_box
                else vectors[lookup[t]]
                if t in lookup
                else vectors[0]
                for t in texts
            ]
        )

    folder = root / "memlayer-memory"
    before = rss_mb()
    started = time.perf_counter()
    with Memory(path=folder, embedder=table_embedder) as memory:
        ids: list[str] = []
        for start in range(0, len(docs), 1000):
            ids.extend(memory.add_many(docs[start : start + 1000]))
        memory.flush()
        build = time.perf_counter() - started
        position = {rid: i for i, rid in enumerate(ids)}

        def search(query: np.ndarray) -> list[int]:
            key = f"q{hash(query.tobytes())}"
            query_box[key] = query
            return [position[h.id] for h in memory.search(key, k=K, mode="vector")]

        found, p50, p95 = timed_queries(search, queries)
        ram = rss_mb() - before
    return Row(
        label,
        "memlayer Memory",
        len(docs) / build,
        p50,
        p95,
        recall(found, truth),
        disk_mb(folder),
        ram,
        build,
    )


def bench_memlayer_index(
    label: str, data: np.ndarray, queries: np.ndarray, truth: np.ndarray, root: Path
) -> Row:
    """memlayer's VectorIndex (what Memory searches), persisted to disk."""
    from memlayer.retrievers.vector_index import VectorIndex

    folder = root / "memlayer-index"
    folder.mkdir()
    before = rss_mb()
    started = time.perf_counter()
    index = VectorIndex(DIM)
    for start in range(0, len(data), 10_000):
        index.add(np.arange(start, min(len(data), start + 10_000)), data[start : start + 10_000])
    index.save(folder / "vectors.idx", applied_seq=1)
    build = time.perf_counter() - started

    def search(query: np.ndarray) -> list[int]:
        return [int(i) for i in index.search(query[None, :], K)[1][0]]

    found, p50, p95 = timed_queries(search, queries)
    row = Row(
        label,
        "memlayer VectorIndex",
        len(data) / build,
        p50,
        p95,
        recall(found, truth),
        disk_mb(folder),
        rss_mb() - before,
        build,
    )
    return row


def bench_chroma(
    label: str,
    data: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    root: Path,
    docs: list[str] | None,
) -> Row:
    import chromadb

    folder = root / "chroma"
    before = rss_mb()
    started = time.perf_counter()
    client = chromadb.PersistentClient(path=str(folder))
    collection = client.create_collection(
        "bench", metadata={"hnsw:space": "ip"}, embedding_function=None
    )
    batch = 5_000
    for start in range(0, len(data), batch):
        stop = min(len(data), start + batch)
        collection.add(
            ids=[str(i) for i in range(start, stop)],
            embeddings=data[start:stop],
            documents=docs[start:stop] if docs else None,
        )
    build = time.perf_counter() - started

    def search(query: np.ndarray) -> list[int]:
        result = collection.query(query_embeddings=query[None, :], n_results=K)
        return [int(i) for i in result["ids"][0]]

    found, p50, p95 = timed_queries(search, queries)
    row = Row(
        label,
        "chroma (embedded)",
        len(data) / build,
        p50,
        p95,
        recall(found, truth),
        disk_mb(folder),
        rss_mb() - before,
        build,
    )
    return row


def bench_lancedb(
    label: str,
    data: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    root: Path,
    docs: list[str] | None,
) -> Row:
    import lancedb
    import pyarrow as pa

    folder = root / "lancedb"
    before = rss_mb()
    started = time.perf_counter()
    db = lancedb.connect(str(folder))
    batch = 50_000
    table = None
    for start in range(0, len(data), batch):
        stop = min(len(data), start + batch)
        columns = {
            "id": pa.array(np.arange(start, stop)),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(data[start:stop].ravel()), DIM),
        }
        if docs:
            columns["text"] = pa.array(docs[start:stop])
        chunk = pa.table(columns)
        table = db.create_table("bench", chunk) if table is None else table
        if start:
            table.add(chunk)
    assert table is not None
    if len(data) >= 100_000:
        table.create_index(metric="dot", vector_column_name="vector")
    build = time.perf_counter() - started

    def search(query: np.ndarray) -> list[int]:
        hits = table.search(query).metric("dot").limit(K).select(["id"]).to_list()
        return [int(h["id"]) for h in hits]

    found, p50, p95 = timed_queries(search, queries)
    return Row(
        label,
        "lancedb (embedded)",
        len(data) / build,
        p50,
        p95,
        recall(found, truth),
        disk_mb(folder),
        rss_mb() - before,
        build,
    )


def run_size(label: str, peers: list[str], n_queries: int, uniform: bool) -> list[Row]:
    n = SIZES[label]
    root = Path(tempfile.mkdtemp(prefix=f"memlayer-bench-{label}-"))
    rows: list[Row] = []
    try:
        if label == "10k":
            docs, data, _, queries = real_corpus(n)
            queries = queries[:n_queries]
        else:
            docs = None
            generate = uniform_vectors if uniform else clustered_vectors
            both = generate(n + n_queries, 1)  # queries come from the same distribution
            data, queries = both[:n], both[n:]
        truth = exact_topk(data, queries)
        tag = label + (" uniform" if uniform else "")
        if docs is not None:
            rows.append(bench_memlayer_memory(tag, docs, data, queries, truth, root))
        rows.append(bench_memlayer_index(tag, data, queries, truth, root))
        print(_line(rows[-1]), flush=True)
        for peer in peers:
            gc.collect()
            try:
                bench = bench_chroma if peer == "chroma" else bench_lancedb
                rows.append(bench(tag, data, queries, truth, root, docs))
                print(_line(rows[-1]), flush=True)
            except ImportError:
                print(f"  {peer} is not installed (pip install {peer}); skipped")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


HEADER = (
    "| size | system | add/s | search p50 ms | p95 ms | recall@10 | disk MB | RAM MB | build s |"
)


def _line(row: Row) -> str:
    return (
        f"| {row.size} | {row.system} | {row.add_per_s:,.0f} | {row.p50_ms:.2f} "
        f"| {row.p95_ms:.2f} | {row.recall_at_10:.3f} | {row.disk_mb:,.0f} "
        f"| {row.ram_mb:,.0f} | {row.build_s:.1f} |"
    )


def _faiss_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["10k", "100k", "1m"], choices=list(SIZES))
    parser.add_argument(
        "--peers", nargs="*", default=["chroma", "lancedb"], choices=["chroma", "lancedb"]
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--uniform", action="store_true", help="also run uniform random vectors")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}  faiss threads: {_faiss_threads()}")
    rows: list[Row] = []
    for label in args.sizes:
        print(f"== {label} ==", flush=True)
        rows.extend(run_size(label, args.peers, args.queries, uniform=False))
        if args.uniform and label != "10k":
            rows.extend(run_size(label, args.peers, args.queries, uniform=True))
    print("\n" + HEADER + "\n|" + "---|" * 9)
    for row in rows:
        print(_line(row))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
