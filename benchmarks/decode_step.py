"""One layer's one-token decode step, part by part, against what the same bytes cost densely.

Issue 12 sets memlayer's decode against the model floor (dense SmolLM2 over 512 tokens).
This benchmark takes one layer of a real session (SmolLM2 fed `--tokens` of passkey
filler, or `--tiny`: random ids through a random 2-layer Llama with SmolLM2's head shapes)
and times, side by side in one run, with the same threads:

- the parts of memlayer's resident step: placing the query (`placed`), scoring and top-k
  (`select`), the page-table lookup (`slots`), the attention over sinks + pages + window
  (`sparse`), the whole step (`attend_resident`), and the new token's write into the window
  (`append`, with its share of the window's occasional move to the buffer's front);
- `sdpa floor`: the floor's attention, PyTorch's SDPA over 512 keys;
- `sdpa same keys`: SDPA over as many keys as the step attends to, stored contiguously (what
  the step would cost with no gather, no selection and no second query placement);
- `copy same bytes`: one copy of the keys and values the step reads (the memory traffic alone).

Medians and minimums of `--repeats` calls (the machines are noisy: the minimum is the least
disturbed call). Writes a JSON file under benchmarks/results/ (or `--json`).

    python benchmarks/decode_step.py --tokens 2000 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from memlayer import KVSession
from memlayer.kernels import cpu_bf16, sparse_attention
from memlayer.kvretrieval.model import load_smollm2
from memlayer.kvretrieval.passkey import samples

RESULTS = Path(__file__).parent / "results"
FLOOR_KEYS = 512


def timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median and minimum microseconds of `repeats` calls (after 5 warm-up calls)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e6)
    return {"median_us": statistics.median(times), "min_us": min(times)}


def tiny_model() -> Any:
    """Two Llama layers with SmolLM2's attention shapes (9 query / 3 KV heads of 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    return LlamaForCausalLM(config).eval()


def measure(session: KVSession, repeats: int) -> list[dict[str, Any]]:
    """The rows: each part of one layer's step, then the dense references."""
    memory = session.cache.memories[len(session.cache.memories) // 2]
    window, sinks = memory.window, memory.sinks
    heads, dim = window.heads, window.keys().shape[-1]
    query_heads = session.model.config.num_attention_heads
    query = torch.randn(1, query_heads, 1, dim)
    key, value = torch.randn(1, heads, 1, dim), torch.randn(1, heads, 1, dim)
    scale = dim**-0.5
    q_local, q_memory = memory._placed_queries(query)
    chosen = memory.select(q_memory, scale)
    k_pool, v_pool, slots = memory.pages.slots(chosen, False)
    keys = sinks.count + chosen.shape[-1] * memory.pages.page_size + window.length

    def sparse() -> torch.Tensor:
        return sparse_attention(
            q_local,
            window.keys()[None],
            window.values()[None],
            q_memory,
            sinks.keys()[None],
            sinks.values()[None],
            k_pool,
            v_pool,
            slots,
            scale=scale,
            padded=False,
        )

    parts = {
        "placed": lambda: memory._placed_queries(query),
        "select": lambda: memory.select(q_memory, scale),
        "slots": lambda: memory.pages.slots(chosen, False),
        "sparse": sparse,
        "attend_resident": lambda: memory.attend_resident(query, scale),
    }
    rows = [{"what": name, "keys": keys, **timed(fn, repeats)} for name, fn in parts.items()]
    state = memory.checkpoint()  # the appends grow the window; put it back after
    rows.append(
        {"what": "append", "keys": 1, **timed(lambda: memory.append(key[0], value[0]), repeats)}
    )
    memory.restore(state)
    dense_k = torch.randn(1, heads, keys, dim)
    dense_v = torch.randn(1, heads, keys, dim)
    for name, count in (("sdpa floor", FLOOR_KEYS), ("sdpa same keys", keys)):
        k, v = dense_k[:, :, :count].contiguous(), dense_v[:, :, :count].contiguous()
        rows.append(
            {
                "what": name,
                "keys": count,
                **timed(
                    lambda k=k, v=v: F.scaled_dot_product_attention(
                        query, k, v, scale=scale, enable_gqa=True
                    ),
                    repeats,
                ),
            }
        )
    both = torch.cat([dense_k, dense_v])
    rows.append({"what": "copy same bytes", "keys": keys, **timed(both.clone, repeats)})
    return rows


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (the platform's, where it cannot)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    names = [
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")
    ]
    return names[0] if names else platform.machine()


def write_record(name: str, args: argparse.Namespace, rows: list[dict[str, Any]]) -> Path:
    """Write the run (command, date, machine, settings, rows) to `args.json`, else to
    results/{name}-{date}.json; print and return where."""
    now = datetime.datetime.now().astimezone()
    path = args.json or RESULTS / f"{name}-{now:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    script = Path(sys.argv[0]).name
    record = {
        "command": shlex.join(["python", f"benchmarks/{script}", *sys.argv[1:]]),
        "date": now.isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "amx_tiles": cpu_bf16.tiles(),
            "load_average": os.getloadavg(),
            "torch": torch.__version__,
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2000, help="context fed before the step")
    parser.add_argument("--selector", default="infllm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--tiny", action="store_true", help="random 2-layer model, no SmolLM2")
    parser.add_argument("--json", type=Path, help="where to write the run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiny:  # random ids: no tokenizer or GGUF to load
        model, tokenizer = tiny_model(), None
        ids = torch.randint(0, 49152, (args.tokens,), generator=torch.Generator().manual_seed(0))
        ids = ids.tolist()
    else:
        model, tokenizer = load_smollm2()
        context = samples(args.tokens, 1, seed=0)[0].context
        ids = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    session = KVSession(model, tokenizer, chat=False, progress=False, selector=args.selector)
    with torch.no_grad():
        session.feed(ids)
        rows = measure(session, args.repeats)
    session.close()
    floor = next(r for r in rows if r["what"] == "sdpa floor")
    print("| part | keys | median µs | min µs | min × sdpa floor |\n|---|---|---|---|---|")
    for row in rows:
        ratio = row["min_us"] / floor["min_us"]
        print(
            f"| {row['what']} | {row['keys']} | {row['median_us']:.0f} | "
            f"{row['min_us']:.0f} | {ratio:.2f} |"
        )
    write_record("decode-step", args, rows)


if __name__ == "__main__":
    main()
