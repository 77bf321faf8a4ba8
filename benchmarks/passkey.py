"""Passkey retrieval with SmolLM2-135M: dense attention vs memlayer's paged KV memory.

For each length, the same fixed-seed samples (key depth spread 5–95%) go through dense
attention (only up to the 8K trained window) and each selector. Reports accuracy, prefill
and decode tokens/s, and peak resident memory per run.

Every prefill computes the logits of its last token only (`logits_to_keep=1`, as memlayer's
feed and transformers' `generate` do): the projection onto SmolLM2's 49K-token vocabulary
for every position of a chunk costs about a quarter of the model's own layers, work no
method needs.

Like for like: both methods get the same token ids (the context, then a newline and the
question, tokenized apart as `KVSession` does). Prefill is the context's tokens over the
time of its forwards only (the question is run but not timed); decode is the one-token
forwards of generated tokens over their time. Method `floor` is the model floor: dense
attention over the context's first 512 tokens only, the speed of the model's own layers with
almost no attention, which memlayer's fixed attention span is measured against. Every run
writes its rows, the command, the date and the machine to a JSON file under
benchmarks/results/ (or `--json`).

    python benchmarks/passkey.py --lengths 2k 4k 8k 16k 32k 64k --methods floor dense infllm quest
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
from pathlib import Path

import torch
from transformers import DynamicCache

from memlayer import KVSession
from memlayer.kvretrieval.model import cache_argument, load_smollm2
from memlayer.kvretrieval.passkey import is_correct, samples

LENGTHS = {"1k": 1000, "2k": 2000, "4k": 4000, "8k": 8000, "16k": 16000, "32k": 32000, "64k": 64000}
DEFAULT_SAMPLES = {"1k": 10, "2k": 10, "4k": 10, "8k": 10, "16k": 5, "32k": 5, "64k": 3}
WINDOW = 8192
FLOOR_TOKENS = 512
RESULTS = Path(__file__).parent / "results"


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def encode(tokenizer, case) -> tuple[list[int], list[int]]:
    """Context ids and question ids, tokenized apart as `KVSession.feed` and `ask` do."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return ids(case.context), ids("\n") + ids(case.question)


def run_dense(model, tokenizer, case, new_tokens: int) -> tuple[bool, float, float]:
    context, question = encode(tokenizer, case)
    cache = DynamicCache(config=model.config)
    pass_cache = {cache_argument(model): cache}
    with torch.no_grad():
        started = time.perf_counter()
        model(torch.tensor([context]), use_cache=True, logits_to_keep=1, **pass_cache)
        prefill = len(context) / (time.perf_counter() - started)
        out = model(torch.tensor([question]), use_cache=True, **pass_cache)
        token, tokens = int(out.logits[0, -1].argmax()), []
        started = time.perf_counter()
        while len(tokens) < new_tokens and token != tokenizer.eos_token_id:
            tokens.append(token)
            out = model(torch.tensor([[token]]), use_cache=True, **pass_cache)
            token = int(out.logits[0, -1].argmax())
        decode = len(tokens) / (time.perf_counter() - started) if tokens else float("nan")
    return is_correct(tokenizer.decode(tokens), case), prefill, decode


def run_floor(model, tokenizer, case, new_tokens: int) -> tuple[bool, float, float]:
    """The model floor: dense attention over the context's first 512 tokens alone, the speed
    of the model's own layers with almost no attention (accuracy does not apply)."""
    context = encode(tokenizer, case)[0][:FLOOR_TOKENS]
    cache = DynamicCache(config=model.config)
    pass_cache = {cache_argument(model): cache}
    with torch.no_grad():
        started = time.perf_counter()
        out = model(torch.tensor([context]), use_cache=True, logits_to_keep=1, **pass_cache)
        prefill = len(context) / (time.perf_counter() - started)
        token = int(out.logits[0, -1].argmax())
        started = time.perf_counter()
        for _ in range(new_tokens):
            out = model(torch.tensor([[token]]), use_cache=True, **pass_cache)
            token = int(out.logits[0, -1].argmax())
        decode = new_tokens / (time.perf_counter() - started)
    return False, prefill, decode


def run_memlayer(
    model, tokenizer, case, new_tokens: int, selector: str, args
) -> tuple[bool, float, float]:
    context, _ = encode(tokenizer, case)
    session = KVSession(
        model,
        tokenizer,
        chat=False,
        progress=False,
        selector=selector,
        n_local=args.n_local,
        topk=args.topk,
        block_size=args.block_size,
        n_init=args.n_init,
        chunk_size=args.chunk_size,
        ram_budget=args.ram_budget,
        page_dtype=args.page_dtype,
        attention_dtype=args.attention_dtype,
    )
    session.feed(context)
    fed = session.stats()  # before the question, prefill is the context alone
    prefill = fed["prefill_tokens"] / fed["prefill_s"]
    answer = session.ask(case.question, max_new_tokens=new_tokens)
    stats = session.stats()
    decode = stats["decode_tokens"] / stats["decode_s"] if stats["decode_tokens"] else float("nan")
    return is_correct(answer, case), prefill, decode


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(path: Path | None, args: argparse.Namespace, rows: list[dict]) -> Path:
    """The run's rows with the command, date, settings and machine; returns where."""
    now = datetime.datetime.now().astimezone()
    if path is None:
        path = RESULTS / f"passkey-{now:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": shlex.join(["python", "benchmarks/passkey.py", *sys.argv[1:]]),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": rows,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lengths",
        nargs="+",
        default=["2k", "4k", "8k", "16k", "32k", "64k"],
        choices=list(LENGTHS),
    )
    parser.add_argument("--methods", nargs="+", default=["floor", "dense", "infllm", "quest"])
    parser.add_argument(
        "--samples", type=int, default=None, help="samples per length (default: 10/5/3)"
    )
    parser.add_argument(
        "--filler",
        choices=["classic", "varied"],
        default="classic",
        help="classic: one five-sentence block repeated; varied: random distinct sentences",
    )
    parser.add_argument("--n-local", type=int, default=512)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-init", type=int, default=64)
    parser.add_argument(
        "--chunk-size", type=int, default=512, help="tokens per prefill chunk (InfLLM's unit)"
    )
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument(
        "--ram-budget",
        default=None,
        help="bound the in-RAM pages (e.g. 64MiB); the rest go to a temporary disk tier",
    )
    parser.add_argument(
        "--page-dtype",
        choices=["auto", "model", "bfloat16"],
        default="auto",
        help="the dtype memlayer keeps sealed pages in (KVConfig.page_dtype)",
    )
    parser.add_argument(
        "--attention-dtype",
        choices=["model", "bfloat16"],
        default="bfloat16",
        help="prefill attention with bfloat16 products (the default) or the model's dtype"
        " (KVConfig.attention_dtype)",
    )
    parser.add_argument(
        "--json", type=Path, help="where to write the run (default: benchmarks/results/)"
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    model, tokenizer = load_smollm2()  # one copy: a KVSession leaves the model as it was
    span = args.n_init + args.topk * args.block_size + args.n_local
    print(f"attention span (init + selected + local): {span} tokens (+ up to one block)")
    rows = []
    header = "| length | method | accuracy | prefill tok/s | decode tok/s | peak RSS MB |"
    print(header + "\n|---|---|---|---|---|---|", flush=True)
    for label in args.lengths:
        count = args.samples or DEFAULT_SAMPLES[label]
        cases = samples(LENGTHS[label], count, seed=1, varied=args.filler == "varied")
        for method in args.methods:
            if method == "dense" and LENGTHS[label] > WINDOW:
                print(f"| {label} | dense | out of window | | | |", flush=True)
                continue
            correct, prefills, decodes, peaks = 0, [], [], []
            for case in cases:
                reset_peak()
                if method == "dense":
                    ok, prefill, decode = run_dense(model, tokenizer, case, args.new_tokens)
                elif method == "floor":
                    ok, prefill, decode = run_floor(model, tokenizer, case, args.new_tokens)
                else:
                    ok, prefill, decode = run_memlayer(
                        model, tokenizer, case, args.new_tokens, method, args
                    )
                correct += ok
                prefills.append(prefill)
                decodes.append(decode)
                peaks.append(peak_mb())
            row = {
                "length": label,
                "method": method,
                "correct": correct,
                "samples": count,
                "prefill_tok_s": statistics.median(prefills),
                "decode_tok_s": statistics.median(decodes),
                "peak_rss_mb": max(peaks),
            }
            rows.append(row)
            accuracy = "n/a" if method == "floor" else f"{correct}/{count}"
            print(
                f"| {label} | {method} | {accuracy} | {row['prefill_tok_s']:.0f} | "
                f"{row['decode_tok_s']:.1f} | {row['peak_rss_mb']:.0f} |",
                flush=True,
            )
    print(f"wrote {write_json(args.json, args, rows)}")


if __name__ == "__main__":
    main()
