"""Where a decode step's time goes on a GPU host: the host or the device.

On the lent GPU machines every decode path measured so far was bound by the host (dense
decode of an 8B model at 60-90 ms per token against 3.8 ms of weight reads). This script
names the parts, in one run on one model (random bf16 weights, `e2e_gpu.py`'s shapes):
  launch    host cost of one tiny kernel (20,000 in-place adds), and a pure-Python loop step;
  dense     one decode step of transformers' eager model + DynamicCache, with SDPA as it
            chooses its backend and with cuDNN attention ruled out: wall ms, the profiler's
            host and device ms, kernel launches per layer, and the costliest host operator;
  memlayer  the same for one `KVSession` decode step (a question answered with 33 tokens less
            the same question with 1: its prompt and the context's checkpoint cancel out),
            and prefill tok/s by chunk size.

    python benchmarks/gpu_host.py --out benchmarks/results/gpu-host.json
    python benchmarks/gpu_host.py --tiny      # a 2-layer model on the CPU: smoke-tests the script
    python benchmarks/gpu_host.py --profile /tmp/prefill.txt   # and where a prefill's time goes
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from e2e_gpu import DEVICE, NO_CUDNN, machine, random_model, synchronize
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernelEx")


def launch_costs(launches: int) -> dict[str, float]:
    """Microseconds per tiny kernel launched back to back, nanoseconds per Python loop step."""
    x = torch.zeros(1, device=DEVICE)
    for _ in range(100):
        x.add_(1)
    synchronize()
    started = time.perf_counter()
    for _ in range(launches):
        x.add_(1)
    synchronize()
    launch_us = (time.perf_counter() - started) / launches * 1e6
    steps, total = 10 * launches, 0
    started = time.perf_counter()
    for i in range(steps):
        total += i
    return {"launch_us": launch_us, "python_step_ns": (time.perf_counter() - started) / steps * 1e9}


def measure(run: Callable[[], Any], repeats: int, profiled: int = 1) -> dict[str, Any]:
    """Wall seconds of `run` (median of `repeats`), then `profiled` profiled runs, of which
    the one of median host time gives: host and device microseconds, kernel launches, aten
    calls (nested included), host time per operator."""
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - started)
    cuda = DEVICE.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiles = []
    for _ in range(profiled):
        with profile(activities=activities) as prof:
            run()
            synchronize()
        events = prof.key_averages()
        profiles.append((sum(e.self_cpu_time_total for e in events), events))
    profiles.sort(key=lambda pair: pair[0])
    events = profiles[len(profiles) // 2][1]
    return {
        "wall_s": statistics.median(times),
        "host_us": sum(e.self_cpu_time_total for e in events),
        "device_us": sum(e.self_device_time_total for e in events) if cuda else None,
        "launches": sum(e.count for e in events if e.key in LAUNCHES),
        "calls": sum(e.count for e in events if e.key.startswith("aten::")),
        "by_op": {e.key: e.self_cpu_time_total for e in events},
    }


def per_step(
    runs: dict[str, Any], layers: int, steps: int = 1, before: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One step's share of `runs` (measure's totals over `steps` steps, less those of
    `before`, a run of everything but those steps): ms, launches and calls per layer, and
    the operator with the most host time and its share."""

    def step(key: str) -> float:
        return (runs[key] - (before[key] if before else 0)) / steps

    by_op = {
        op: (us - (before["by_op"].get(op, 0) if before else 0)) for op, us in runs["by_op"].items()
    }
    host = step("host_us")
    top = max(by_op, key=lambda op: by_op[op])
    return {
        "wall_ms": 1e3 * step("wall_s"),
        "host_ms": host / 1e3,
        "device_ms": None if runs["device_us"] is None else step("device_us") / 1e3,
        "launches_per_layer": step("launches") / layers,
        "ops_per_layer": step("calls") / layers,
        "top_host_op": top,
        "top_host_share": by_op[top] / steps / host,
    }


@contextmanager
def no_grad_backends(backends: list[SDPBackend] | None) -> Iterator[None]:
    with torch.no_grad(), sdpa_kernel(backends) if backends else nullcontext():
        yield


def dense_step(model: Any, context: list[int], backends: list[SDPBackend] | None) -> Any:
    """A decode step of the dense model after prefilling `context` (the cache grows a token per
    call, as in generation)."""
    from transformers import DynamicCache

    from memlayer.kvretrieval.model import cache_argument

    cache = {cache_argument(model): DynamicCache(config=model.config)}
    with no_grad_backends(backends):
        model(torch.tensor([context], device=DEVICE), logits_to_keep=1, **cache)

    def step() -> None:
        with no_grad_backends(backends):
            model(torch.tensor([[5]], device=DEVICE), **cache)

    return step


def prefill_profile(model: Any, context: list[int], chunk: int, path: Path) -> dict[str, Any]:
    """Where a warm prefill's time goes: a second feed of `context` in `chunk`-token chunks
    (the first compiles every kernel variant) under cProfile (Python functions by own and by
    cumulative time) and under the torch profiler (operators by host and device time); the
    tables go to `path`, the totals are returned."""
    import cProfile
    import io
    import pstats

    from memlayer import KVSession

    def feed() -> None:
        KVSession(model, None, chat=False, progress=False, chunk_size=chunk).feed(context)
        synchronize()

    feed()
    python = cProfile.Profile()
    started = time.perf_counter()
    python.runcall(feed)
    wall = time.perf_counter() - started
    text = io.StringIO()
    stats = pstats.Stats(python, stream=text)
    for order in ("tottime", "cumulative"):
        stats.sort_stats(order).print_stats(35)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with profile(activities=activities) as prof:
        feed()
    events = prof.key_averages()
    for order in ("self_cpu_time_total", "self_device_time_total"):
        text.write(events.table(sort_by=order, row_limit=30) + "\n")
    path.write_text(text.getvalue())
    return {
        "chunk": chunk,
        "wall_s_under_cprofile": wall,
        "host_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
        "device_ms": sum(e.self_device_time_total for e in events) / 1e3,
        "launches": sum(e.count for e in events if e.key in LAUNCHES),
    }


def memlayer_runs(model: Any, context: list[int], chunks: list[int], steps: int) -> dict[str, Any]:
    """Prefill tok/s per chunk size (the second of two feeds), and a decode step's profile: a
    question answered with 1 + `steps` tokens less the same question with 1 token (its
    prompt's forward and the checkpoint and restore of the fed context cancel out)."""
    from memlayer import KVSession

    warm = KVSession(model, None, chat=False, progress=False)
    warm.feed(context[:2048])
    warm.continue_ids([1], 2)
    prefill = {}
    for chunk in chunks:
        for _ in range(2):  # the first feed compiles the Triton variants this chunk size meets
            session = KVSession(model, None, chat=False, progress=False, chunk_size=chunk)
            synchronize()
            started = time.perf_counter()
            session.feed(context)
            synchronize()
        prefill[str(chunk)] = len(context) / (time.perf_counter() - started)
    session = KVSession(model, None, chat=False, progress=False)
    session.feed(context)
    layers = model.config.num_hidden_layers
    # a difference of two profiles: the median of three each, so one slow run cannot flip it
    short = measure(lambda: session.continue_ids([1], 1), repeats=5, profiled=3)
    long = measure(lambda: session.continue_ids([1], 1 + steps), repeats=5, profiled=3)
    step = per_step(long, layers, steps, before=short)
    return {"prefill_tok_s_by_chunk": prefill, "decode_step": step}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="smollm2", choices=["smollm2", "llama3-8b"])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--tiny", action="store_true", help="tiny shape, 2K; CPU ok")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    parser.add_argument(
        "--profile",
        type=Path,
        help="also profile a warm prefill in 2,048-token chunks: tables here",
    )
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.context, args.chunks = "tiny", 2048, [512, 2048]
    elif DEVICE.type != "cuda":
        sys.exit("gpu_host.py: needs a CUDA GPU (or --tiny to smoke-test on the CPU)")
    record: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/gpu_host.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "model": {"shape": args.shape, "weights": "random", "dtype": "bfloat16"},
        "context": args.context,
        **launch_costs(2000 if args.tiny else 20000),
    }
    model = random_model(args.shape)
    layers = model.config.num_hidden_layers
    context = torch.randint(100, 49000, (args.context,), generator=torch.Generator().manual_seed(1))
    tokens = context.tolist()
    record["dense_step"] = per_step(measure(dense_step(model, tokens, None), 20), layers)
    no_cudnn = dense_step(model, tokens, NO_CUDNN)
    record["dense_step_no_cudnn"] = per_step(measure(no_cudnn, 20), layers)
    record["memlayer"] = memlayer_runs(model, tokens, args.chunks, steps=32)
    print(
        f"{record['machine'].get('gpu', 'cpu')}: launch {record['launch_us']:.1f} us, "
        f"Python loop step {record['python_step_ns']:.0f} ns"
    )
    print(
        "| decode step | wall ms | host ms | device ms | launches/layer | aten calls/layer, nested "
        "| top host op (share) |"
    )
    print("|---|---|---|---|---|---|---|")
    steps = [
        ("dense, SDPA's choice", record["dense_step"]),
        ("dense, no cuDNN attention", record["dense_step_no_cudnn"]),
        ("memlayer", record["memlayer"]["decode_step"]),
    ]
    for name, row in steps:
        device = "" if row["device_ms"] is None else f"{row['device_ms']:.1f}"
        print(
            f"| {name} | {row['wall_ms']:.1f} | {row['host_ms']:.1f} | {device} | "
            f"{row['launches_per_layer']:.0f} | {row['ops_per_layer']:.0f} | "
            f"{row['top_host_op']} ({row['top_host_share']:.0%}) |"
        )
    if args.profile:
        record["prefill_profile"] = prefill_profile(
            model, tokens, min(2048, args.context), args.profile
        )
        print("warm prefill profiled:", record["prefill_profile"])
    prefill = record["memlayer"]["prefill_tok_s_by_chunk"]
    print(
        "memlayer prefill tok/s by chunk: "
        + ", ".join(f"{c}: {v:,.0f}" for c, v in prefill.items())
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
