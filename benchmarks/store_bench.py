"""Tiered page store throughput, each side by side with the raw copy or read of the same bytes.

Pages are one layer's KV of 64 tokens × 8 KV heads × 128 dims × (K, V) in bf16 (256 KiB).
Rows:
- promotion RAM→GPU (PageStore prefetch into the front tier) vs one plain copy of the same
  bytes (pinned `tensor.to(device, non_blocking=True)` on CUDA; a host memcpy on CPU), for
  every page in slot order and for a random half in random order (a top-k selection);
- disk→RAM promotion (PageStore prefetch from segment files, checksums verified) vs a raw
  sequential `readinto` of the same segment files (both from the page cache), and vs the
  same bytes read raw by as many threads as the disk tier reads with (`read_threads`);
- prefetch overlap: attention-like compute alone, fetch alone, and prefetch-then-compute,
  reporting the share of the transfer time hidden behind compute.

    python benchmarks/store_bench.py --pages 512 --repeats 5 --out benchmarks/out/store.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from memlayer.stores import DiskTier, PageStore, TensorTier
from memlayer.types import Page

TOKENS, KV_HEADS, DIM = 64, 8, 128


def kv_page(index: int) -> Page:
    keys = torch.randn(KV_HEADS, TOKENS, DIM).bfloat16()
    return Page(id=f"p{index}", payload={"k": keys, "v": keys.flip(0)})


def warm_front(device: torch.device, budget: int | None) -> TensorTier:
    """A front tier in steady state: one resident page keeps its slab allocated between runs,
    as in a running session (an emptied slab is released and the next put allocates anew)."""
    tier = TensorTier("gpu" if device.type == "cuda" else "front", device, budget)
    tier.put(kv_page(-1))
    return tier


def evicting(tier: TensorTier, ids: list[str]) -> Callable[[], None]:
    """A set-up step that takes these pages out of `tier` (so the next run promotes them)."""

    def evict() -> None:
        for page_id in ids:
            if page_id in tier:
                tier.evict(page_id)

    return evict


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    run: Callable[[], None],
    repeats: int,
    device: torch.device,
    setup: Callable[[], None] = lambda: None,
) -> float:
    """Median wall time of `run` over `repeats` (after one warm-up); `setup` is not timed."""
    setup()
    run()
    sync(device)
    times = []
    for _ in range(repeats):
        setup()
        sync(device)
        started = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def promotion(
    pages: list[Page], device: torch.device, repeats: int, *, scattered: bool = False
) -> dict[str, float]:
    """RAM→front-tier promotion vs one plain copy of the same bytes.

    `scattered`: promote a random half of the pages in random order, as a top-k selection
    does, so no two promoted pages sit in neighbouring RAM slots by design."""
    ram = TensorTier("ram", "cpu", None)
    for page in pages:
        ram.put(page)
    if scattered:
        pages = random.Random(0).sample(pages, len(pages) // 2)
    total = sum(p.nbytes for p in pages)
    ids = [p.id for p in pages]
    front = warm_front(device, total * 2)
    store = PageStore([front, ram])

    def promote() -> None:
        store.prefetch(ids).result()

    source = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    source.random_()  # an untouched source would read the kernel's shared zero page
    target = torch.empty(total, dtype=torch.uint8, device=device)

    def plain_copy() -> None:
        target.copy_(source, non_blocking=True)

    ours = median_seconds(promote, repeats, device, setup=evicting(front, ids))
    raw = median_seconds(plain_copy, repeats, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the prefetch worker copies on one thread
    raw_one_thread = median_seconds(plain_copy, repeats, device)
    torch.set_num_threads(threads)
    store.close()
    return {"bytes": total, "ours_s": ours, "baseline_s": raw, "one_thread_s": raw_one_thread}


def disk_read(pages: list[Page], folder: Path, repeats: int, read_threads: int) -> dict[str, float]:
    """disk→RAM promotion through the store vs a raw sequential read of the same files."""
    disk = DiskTier(folder / "disk", sync=False, read_threads=read_threads)
    disk.put_many(pages)
    ids = [p.id for p in pages]
    ram = warm_front(torch.device("cpu"), None)
    store = PageStore([ram, disk])

    def through_store() -> None:
        store.prefetch(ids).result()

    files = sorted((folder / "disk").glob("segment-*.log"))
    size = sum(f.stat().st_size for f in files)
    buffer = bytearray(size)

    def raw_read() -> None:
        view = memoryview(buffer)
        for file in files:
            with open(file, "rb", buffering=0) as handle:
                view = view[handle.readinto(view) :]

    threads = disk.read_threads
    parts = [(file, start) for file in files for start in range(0, file.stat().st_size, 1 << 20)]

    def raw_read_threaded() -> None:
        """The files in 1 MiB parts, shared out to `threads` threads as each is free."""
        todo = iter(parts)

        def work() -> None:
            for file, start in todo:
                with open(file, "rb", buffering=0) as handle:
                    handle.seek(start)
                    handle.readinto(memoryview(buffer)[start : start + (1 << 20)])

        with ThreadPoolExecutor(threads) as pool:
            for share in [pool.submit(work) for _ in range(threads)]:
                share.result()

    cpu = torch.device("cpu")
    ours = median_seconds(through_store, repeats, cpu, setup=evicting(ram, ids))
    raw = median_seconds(raw_read, repeats, cpu)
    raw_threads = median_seconds(raw_read_threaded, repeats, cpu)
    store.close()
    return {
        "bytes": sum(p.nbytes for p in pages),
        "ours_s": ours,
        "baseline_s": raw,
        "read_threads": threads,
        "raw_threads_s": raw_threads,
    }


def prefetch_overlap(
    pages: list[Page], device: torch.device, repeats: int, compute_threads: int
) -> dict[str, float]:
    """Compute alone, fetch alone, and prefetch overlapped with compute."""
    ids = [p.id for p in pages]
    ram = TensorTier("ram", "cpu", None)
    for page in pages:
        ram.put(page)
    front = warm_front(device, sum(p.nbytes for p in pages) * 2)
    store = PageStore([front, ram])
    queries = torch.randn(1024, DIM, device=device, dtype=torch.float32)
    keys = torch.randn(DIM, 1024, device=device, dtype=torch.float32)
    steps = 1

    def compute() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(compute_threads)
        for _ in range(steps):
            torch.softmax(queries @ keys, dim=-1)
        torch.set_num_threads(threads)

    def fetch() -> None:
        store.prefetch(ids).result()

    def overlapped() -> None:
        pending = store.prefetch(ids)
        compute()
        pending.result()

    fetch_s = median_seconds(fetch, repeats, device, setup=evicting(front, ids))
    steps = max(1, round(3 * fetch_s / median_seconds(compute, repeats, device)))
    results = {  # compute sized to about 3× the transfer
        "compute_s": median_seconds(compute, repeats, device),
        "fetch_s": fetch_s,
        "overlapped_s": median_seconds(overlapped, repeats, device, setup=evicting(front, ids)),
    }
    store.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--compute-threads",
        type=int,
        default=torch.get_num_threads(),
        help="CPU threads of the overlap row's compute (fewer than cores leaves one to prefetch)",
    )
    parser.add_argument(
        "--read-threads", type=int, default=2, help="the disk tier's read_threads (its default: 2)"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pages = [kv_page(i) for i in range(args.pages)]
    with tempfile.TemporaryDirectory() as folder:
        results = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "page_bytes": pages[0].nbytes,
            "promotion": promotion(pages, device, args.repeats),
            "promotion_scattered": promotion(pages, device, args.repeats, scattered=True),
            "disk_read": disk_read(pages, Path(folder), args.repeats, args.read_threads),
            "prefetch": prefetch_overlap(
                pages[: args.pages // 4], device, args.repeats, args.compute_threads
            ),
        }
    gb = 1e9
    print(f"device: {results['device']}; {args.pages} pages of {pages[0].nbytes // 1024} KiB")
    print("| measure | memlayer GB/s | baseline GB/s | ratio | one-thread copy GB/s | ratio |")
    print("|---|---|---|---|---|---|")
    for key, label, baseline in (
        ("promotion", "RAM→front tier promotion", "plain copy"),
        ("promotion_scattered", "RAM→front, a scattered half", "plain copy"),
        ("disk_read", "disk→RAM promotion", "raw sequential read"),
    ):
        row = results[key]
        ours, raw = row["bytes"] / row["ours_s"] / gb, row["bytes"] / row["baseline_s"] / gb
        line = f"| {label} vs {baseline} | {ours:.2f} | {raw:.2f} | {ours / raw:.0%} |"
        if "one_thread_s" in row:
            one = row["bytes"] / row["one_thread_s"] / gb
            line += f" {one:.2f} | {ours / one:.0%} |"
        else:
            line += " | |"
        print(line)
    disk = results["disk_read"]
    ours, threaded = disk["bytes"] / disk["ours_s"] / gb, disk["bytes"] / disk["raw_threads_s"] / gb
    print(
        f"| disk→RAM promotion vs a raw read on {disk['read_threads']} threads | {ours:.2f} |"
        f" {threaded:.2f} | {ours / threaded:.0%} | | |"
    )
    over = results["prefetch"]
    hidden = (over["compute_s"] + over["fetch_s"] - over["overlapped_s"]) / over["fetch_s"]
    results["prefetch"]["hidden_share"] = hidden
    print(
        f"prefetch: compute {over['compute_s'] * 1e3:.1f} ms, fetch {over['fetch_s'] * 1e3:.1f} ms,"
        f" overlapped {over['overlapped_s'] * 1e3:.1f} ms: {hidden:.0%} of the transfer hidden"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
