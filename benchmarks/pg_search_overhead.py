"""What `Memory.search` on PostgreSQL costs on top of the SQL it needs, query by query.

For each query of a `memory_bench.py` workload whose records a run left in `--pg-data`, in
alternating order: the raw SQL through psycopg (one connection, no pool, the way's settings
and one statement that ranks and reads the hits' columns, in one transaction: the least a
client can send), and `Memory.search` in vector mode, with and without the 1% filter of
`memory_bench.py` (`{"shard": 7}`, ranked exactly). Reports p50 / p95 of both and the median
of the per-query differences (pairing cancels most of a noisy machine's drift).

    python benchmarks/memory_bench.py --sizes 100k --systems memlayer-postgres --pg-data /tmp/pg
    python benchmarks/pg_search_overhead.py --pg-data /tmp/pg
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import memory_bench as bench
import numpy as np

COLUMNS = (
    "rowid, id, tenant_id, user_id, agent_id, session_id, text, metadata, created_at, updated_at"
)
UNFILTERED = (
    f"SELECT {COLUMNS}, embedding <=> %s AS distance FROM records WHERE tenant_id = '' "
    "ORDER BY distance LIMIT %s"
)
FILTERED = (  # exact: ordered by distance + 0, which HNSW cannot serve (as memlayer does)
    f"SELECT {COLUMNS}, (embedding <=> %s) + 0 AS distance FROM records WHERE tenant_id = '' "
    "AND metadata @> %s::jsonb ORDER BY distance LIMIT %s"
)


def raw_search(conn: Any, query: np.ndarray, ef: int, filtered: bool) -> list[str]:
    """The SQL alone: settings and one statement in one transaction, then commit."""
    if filtered:
        shard = json.dumps({"shard": bench.SHARD})
        rows = conn.execute(FILTERED, (query, shard, bench.K)).fetchall()
    else:
        conn.execute(
            "SELECT set_config('enable_seqscan', 'off', true), "
            "set_config('hnsw.ef_search', %s, true), "
            "set_config('hnsw.iterative_scan', 'relaxed_order', true)",
            (str(ef),),
        )
        rows = conn.execute(UNFILTERED, (query, bench.K)).fetchall()
    conn.commit()
    return [row[6] for row in rows]


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "p50_ms": statistics.median(ordered),
        "p95_ms": ordered[int(0.95 * (len(ordered) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-data", type=Path, required=True, help="memory_bench's --pg-data")
    parser.add_argument("--size", default="100k", choices=["20k", "100k", "1m"])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef", type=int, default=40, help="hnsw.ef_search (both sides)")
    parser.add_argument("--json", type=Path, help="where to write the numbers")
    args = parser.parse_args()

    import psycopg
    from pgvector.psycopg import register_vector

    from memlayer import Memory
    from memlayer.retrievers.vector_index import IndexConfig

    root = Path(tempfile.mkdtemp(prefix="pg-overhead-"))
    work = bench.make_workload(args.size, False, args.queries, root, 0.95, args.pg_data)
    assert work.pg_data is not None
    if not (work.pg_data.parent / f"{work.pg_data.name}-load.json").exists():
        raise SystemExit(f"no records in {work.pg_data}: load them with memory_bench.py first")
    server = bench.pg_server(work.pg_data)
    uri = server.get_uri()
    embed, box = bench.table_embedder(work)
    index_of = {text: i for i, text in enumerate(work.docs)}
    report: dict[str, Any] = {
        "command": "python benchmarks/pg_search_overhead.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": bench.git_commit(),
        "uncommitted": bench.tree_changes(),
        "machine": bench.machine(),
        "load_start": bench.loadavg(),
    }
    try:
        config = IndexConfig(hnsw_ef_search=args.ef)
        url = uri.replace("postgresql://", "postgresql+psycopg://", 1)
        with (
            Memory(url=url, embedder=embed, index_config=config) as memory,
            psycopg.connect(uri) as conn,
        ):
            register_vector(conn)
            for filtered in (False, True):  # warm both ways' pages first
                for query in work.queries[:20]:
                    raw_search(conn, query, args.ef, filtered)
            for filtered in (False, True):
                times: dict[str, list[float]] = {"raw": [], "memory": []}
                same = 0
                filters = {"shard": bench.SHARD} if filtered else None
                for n, query in enumerate(work.queries):
                    key = f"q{n}"
                    box[key] = query
                    got: dict[str, list[str]] = {}
                    for side in ("raw", "memory") if n % 2 == 0 else ("memory", "raw"):
                        started = time.perf_counter()
                        if side == "raw":
                            got[side] = raw_search(conn, query, args.ef, filtered)
                        else:
                            hits = memory.search(key, k=bench.K, mode="vector", filters=filters)
                            got[side] = [h.text for h in hits]
                        times[side].append((time.perf_counter() - started) * 1000)
                    same += [index_of[t] for t in got["raw"]] == [
                        index_of[t] for t in got["memory"]
                    ]
                differences = [m - r for m, r in zip(times["memory"], times["raw"], strict=True)]
                label = "filter 1% (exact)" if filtered else "unfiltered (HNSW)"
                row = {
                    "raw": summary(times["raw"]),
                    "memory": summary(times["memory"]),
                    "overhead_median_ms": statistics.median(differences),
                    "same_hits": same / len(work.queries),
                }
                report[label] = row
                print(
                    f"{label}: raw SQL p50 {row['raw']['p50_ms']:.2f} / p95 "
                    f"{row['raw']['p95_ms']:.2f} ms; Memory.search p50 "
                    f"{row['memory']['p50_ms']:.2f} / p95 {row['memory']['p95_ms']:.2f} ms; "
                    f"median overhead {row['overhead_median_ms']:.2f} ms; same hits "
                    f"{row['same_hits']:.0%}",
                    flush=True,
                )
    finally:
        server.cleanup()
    report["load_end"] = bench.loadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
