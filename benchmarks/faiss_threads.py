"""One-query searches: memlayer's VectorIndex beside FAISS with its default thread team.

`VectorIndex` runs a flat search of fewer than `SERIAL_BELOW` queries on the calling thread
alone: FAISS scans a few queries one per thread, so a team adds no speed, and on a machine
whose other cores are busy its barrier waits for one to come free. Side by side in one run:
the same unit vectors and queries, p50/p95 of one-query searches through a FAISS flat index
on its default threads (what VectorIndex did before) and through VectorIndex, on an idle
machine and with a neighbour process spinning on one core (as a second worker, a test run
or a model in the same process would).

    python benchmarks/faiss_threads.py --sizes 2000 10000 45000 --queries 200

Sizes stay under `IndexConfig.approx_threshold` (flat); an IVF search of one query runs on
one thread either way. Writes JSON under benchmarks/results/ (or `--json`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from memlayer.retrievers.vector_index import VectorIndex

RESULTS = Path(__file__).parent / "results"
DIM = 384


def spin(stop: Any) -> None:
    """A busy neighbour: one core at 100% until told to stop."""
    while not stop.is_set():
        sum(range(10_000))


def timed(index: Any, queries: np.ndarray) -> dict[str, float]:
    """p50 and p95 milliseconds of one-query top-10 searches."""
    times = []
    for query in queries:
        started = time.perf_counter()
        index.search(query[None], 10)
        times.append((time.perf_counter() - started) * 1e3)
    times.sort()
    return {"p50_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))]}


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random unit vectors."""
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 10_000, 45_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--json", type=Path, help="where to write the run")
    args = parser.parse_args()
    team = faiss.omp_get_max_threads()
    rng = np.random.default_rng(0)
    rows = []
    for size in args.sizes:
        data = unit(rng, size)
        ids = np.arange(size, dtype=np.int64)
        systems = {"faiss": faiss.IndexIDMap(faiss.IndexFlatIP(DIM)), "memlayer": VectorIndex(DIM)}
        systems["faiss"].add_with_ids(data, ids)
        systems["memlayer"].add(ids, data)
        queries = unit(rng, args.queries)
        for busy in (False, True):
            stop = multiprocessing.Event()
            neighbour = multiprocessing.Process(target=spin, args=(stop,)) if busy else None
            if neighbour:
                neighbour.start()
                time.sleep(0.5)
            try:
                for _ in range(2):  # alternate, so drift hits both alike
                    for system, index in systems.items():
                        row = {"vectors": size, "busy": busy, "system": system}
                        rows.append(row | timed(index, queries))
            finally:
                stop.set()
                if neighbour:
                    neighbour.join()
    summary = []
    print(
        f"| vectors | neighbour | FAISS flat, {team} threads: p50 / p95 ms | memlayer | p50 ratio |"
    )
    print("|---|---|---|---|---|")
    for size in args.sizes:
        for busy in (False, True):
            cell = {}
            for system in systems:
                runs = [
                    r
                    for r in rows
                    if (r["vectors"], r["busy"], r["system"]) == (size, busy, system)
                ]
                cell[system] = {
                    key: statistics.median(r[key] for r in runs) for key in ("p50_ms", "p95_ms")
                }
            faiss_cell, ours = cell["faiss"], cell["memlayer"]
            summary.append({"vectors": size, "busy": busy} | cell)
            print(
                f"| {size:,} | {'one core busy' if busy else 'idle'} "
                f"| {faiss_cell['p50_ms']:.2f} / {faiss_cell['p95_ms']:.2f} "
                f"| {ours['p50_ms']:.2f} / {ours['p95_ms']:.2f} "
                f"| {faiss_cell['p50_ms'] / ours['p50_ms']:.1f}× |"
            )
    today = datetime.date.today().isoformat()
    out = args.json or RESULTS / f"faiss-threads-{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": today,
                "machine": {"cpu": platform.processor(), "cores": os.cpu_count()},
                "faiss": faiss.__version__,
                "load": os.getloadavg(),
                "rows": rows,
                "summary": summary,
            },
            indent=1,
        )
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
