"""Group commit on SQLite: concurrent single-record adds, each in its own transaction (what
0.2 did) against joined into shared transactions, side by side in one run.

Threads add one record per call (hash embedder: the numbers are the database's, not a
model's); each writer returns only once its record is committed (fsync). Medians over
`--repeats` runs per setting; the JSON goes under benchmarks/results/.

    python benchmarks/group_commit.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from memlayer import Memory

RESULTS = Path(__file__).resolve().parent / "results"


def _one_transaction_per_add(memory: Memory) -> None:
    """The peer: every batch committed alone, in turn, under the memory's write lock."""
    group = memory._group_commit

    def alone(batch: Any) -> None:
        with memory._lock:
            group.transactions += 1
            memory._commit_batches([batch])

    group.submit = alone  # type: ignore[method-assign]


def run(threads: int, adds: int, grouped: bool) -> dict[str, Any]:
    """`adds` single-record adds spread over `threads` threads: adds/s and transactions."""
    with tempfile.TemporaryDirectory() as folder, Memory(folder, embedder="hash") as memory:
        memory.add("warm up")
        if not grouped:
            _one_transaction_per_add(memory)
        before = memory._group_commit.transactions
        per = adds // threads

        def writer(n: int) -> None:
            for i in range(per):
                memory.add(f"thread {n} note {i} about travel and coffee", user_id=f"u{n}")

        workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall = time.perf_counter() - started
        return {
            "grouped": grouped,
            "threads": threads,
            "adds": per * threads,
            "transactions": memory._group_commit.transactions - before,
            "adds_per_s": per * threads / wall,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--adds", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = [
        run(threads, args.adds, grouped)
        for _ in range(args.repeats)
        for threads in args.threads
        for grouped in (False, True)
    ]
    print("| threads | one transaction per add: adds/s | grouped: adds/s | ratio | transactions |")
    print("|---|---|---|---|---|")
    table = []
    for threads in args.threads:
        alone, joined = (
            [r for r in runs if r["threads"] == threads and r["grouped"] == grouped]
            for grouped in (False, True)
        )
        row = {
            "threads": threads,
            "alone_adds_per_s": statistics.median(r["adds_per_s"] for r in alone),
            "grouped_adds_per_s": statistics.median(r["adds_per_s"] for r in joined),
            "grouped_transactions": statistics.median(r["transactions"] for r in joined),
            "adds": joined[0]["adds"],
        }
        table.append(row)
        print(
            f"| {threads} | {row['alone_adds_per_s']:.0f} | {row['grouped_adds_per_s']:.0f} | "
            f"{row['grouped_adds_per_s'] / row['alone_adds_per_s']:.2f}× | "
            f"{row['grouped_transactions']:.0f} for {row['adds']} adds |"
        )
    report = {
        "benchmark": "group_commit",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "settings": {**vars(args), "out": str(args.out) if args.out else None},
        "runs": runs,
        "table": table,
    }
    out = args.out or RESULTS / f"group-commit-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
