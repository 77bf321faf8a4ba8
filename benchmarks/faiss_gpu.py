"""FAISS on the GPU (issue 12): memlayer's vector index searched on the CPU and on a GPU.

One `VectorIndex` per index kind is built on the CPU and saved, then loaded twice, with
`IndexConfig(device="cpu")` and `device="cuda"`, so both columns search the same trained
index with the same settings (the GPU one through its GPU copy):

  ivf   what memlayer uses past 50K vectors: IVF with exact vectors in its lists,
        nprobe as IndexConfig sets it (24 of 4,000 lists at 1M);
  flat  exact search (what memlayer uses below 50K vectors), at the same size.

Data: 384-d unit vectors around 4,096 centres (memory_bench.py's clustered data), 1M by
default, and held-out queries from the same distribution. Per index and device: recall@10
against exact search, p50/p95 ms of one query at a time, queries/s of all the queries in
one batched call, and the first search's time (on the GPU it copies the index there).
FAISS on the CPU uses every core it sees (the thread count is recorded). Needs FAISS's GPU
build (faiss-gpu, swapped in for faiss-cpu) and a GPU, except `--tiny` (20K vectors), which runs on
the CPU and marks the GPU column "not measured: no CUDA FAISS" where there is none: it
smoke-tests the script.

    python benchmarks/faiss_gpu.py --out benchmarks/results/faiss-gpu.json
    python benchmarks/faiss_gpu.py --tiny --out /tmp/faiss-gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from memory_bench import DIM, K, clustered_vectors, exact_topk

from memlayer.retrievers import faiss_device
from memlayer.retrievers.vector_index import IndexConfig, VectorIndex

NO_GPU = "not measured: no CUDA FAISS"
KINDS = ("ivf", "flat")


def build(kind: str, data: np.ndarray, folder: Path, approx_threshold: int) -> Path:
    """Build the index on the CPU in batches, as Memory adds, and save it."""
    threshold = approx_threshold if kind == "ivf" else 10**12
    index = VectorIndex(DIM, IndexConfig(device="cpu", approx_threshold=threshold))
    for start in range(0, len(data), 100_000):
        stop = min(len(data), start + 100_000)
        index.add(np.arange(start, stop), data[start:stop])
    assert index.approximate == (kind == "ivf")
    path = folder / f"{kind}.idx"
    index.save(path, applied_seq=0)
    return path


def setting(index: VectorIndex) -> str:
    if not index.approximate:
        return "exact"
    return f"nprobe {index._nprobe()} of {index._nlist()} lists"


def recall(found: np.ndarray, data: np.ndarray, queries: np.ndarray, kth: np.ndarray) -> float:
    """Mean share of the K answers at least as similar as the true K-th neighbour."""
    shares = []
    for query, ids, bound in zip(queries, found, kth, strict=True):
        ids = ids[ids >= 0]
        sims = data[ids] @ query
        shares.append(min(K, int((sims >= bound - 1e-5).sum())) / K)
    return float(np.mean(shares))


def measure(
    index: VectorIndex, data: np.ndarray, queries: np.ndarray, kth: np.ndarray
) -> dict[str, Any]:
    """One index on one device: first search, one-at-a-time latency, batched throughput."""
    started = time.perf_counter()
    index.search(queries[:1], K)
    first_s = time.perf_counter() - started
    for query in queries[:5]:
        index.search(query[None, :], K)
    found, times = [], []
    for query in queries:
        started = time.perf_counter()
        found.append(index.search(query[None, :], K)[1][0])
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    batch_s = []
    for _ in range(3):
        started = time.perf_counter()
        index.search(queries, K)
        batch_s.append(time.perf_counter() - started)
    return {
        "recall": recall(np.stack(found), data, queries, kth),
        "p50_ms": statistics.median(times),
        "p95_ms": times[int(0.95 * (len(times) - 1))],
        "batch_qps": len(queries) / statistics.median(batch_s),
        "first_search_s": first_s,
    }


def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def table(record: dict[str, Any]) -> list[str]:
    """The rows as aligned text lines."""
    lines = [
        f"{'index':<6}{'setting':<26}{'device':<7}{'recall@10':>10}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'batch q/s':>11}{'first s':>9}"
    ]
    for row in record["rows"]:
        head = f"{row['index']:<6}{row['setting']:<26}{row['device']:<7}"
        if "note" in row:
            lines.append(f"{head}{row['note']}")
            continue
        lines.append(
            f"{head}{row['recall']:>10.3f}{row['p50_ms']:>9.3f}{row['p95_ms']:>9.3f}"
            f"{row['batch_qps']:>11.0f}{row['first_search_s']:>9.2f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="20K vectors, 100 queries; CPU ok")
    parser.add_argument("--vectors", type=int, default=0, help="vectors (default 1M)")
    parser.add_argument("--queries", type=int, default=0, help="queries (default 1,000)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "faiss-gpu.json"
    )
    args = parser.parse_args()
    has_gpu = faiss_device.gpu_count(faiss) > 0
    if not (has_gpu or args.tiny):
        sys.exit(
            "benchmarks/faiss_gpu.py needs FAISS's GPU build and a GPU (faiss-gpu in place "
            "of faiss-cpu), or --tiny; nothing was measured."
        )
    n = args.vectors or (20_000 if args.tiny else 1_000_000)
    n_queries = args.queries or (100 if args.tiny else 1_000)
    # the IVF past 5K vectors in --tiny, so 20K vectors take the IVF path as 1M does
    approx_threshold = 5_000 if args.tiny else IndexConfig().approx_threshold
    print(f"data: {n:,} x {DIM}-d clustered unit vectors, {n_queries:,} queries", flush=True)
    vectors = clustered_vectors(n + n_queries, seed=0)
    data, queries = vectors[:n], vectors[n:]
    kth = exact_topk(data, queries)[1]
    record: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/faiss_gpu.py", *sys.argv[1:]]),
        "gpu": gpu_name() if has_gpu else None,
        "faiss": faiss.__version__,
        "cpu_threads": faiss.omp_get_max_threads(),
        "vectors": n,
        "dim": DIM,
        "queries": n_queries,
        "k": K,
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.kinds:
            print(f"building the {kind} index on the CPU", flush=True)
            path = build(kind, data, Path(folder), approx_threshold)
            for device in ("cpu", "cuda") if has_gpu else ("cpu",):
                config = IndexConfig(device=device, approx_threshold=approx_threshold)
                index, _ = VectorIndex.load(path, config)
                assert index.on_gpu == (device == "cuda")
                row = {"index": kind, "setting": setting(index), "device": device}
                record["rows"].append(row | measure(index, data, queries, kth))
                print("  " + table({"rows": record["rows"][-1:]})[1], flush=True)
                del index
            if not has_gpu:
                record["rows"].append({**row, "device": "cuda", "note": NO_GPU})
    print(
        f"{record['gpu'] or 'no GPU'}; FAISS {record['faiss']}, CPU threads {record['cpu_threads']}"
    )
    print("\n".join(table(record)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
