"""Decode speed against the model floor, interleaved: floor, dense and each selector take turns.

`passkey.py` times 8 answer tokens per sample, each method minutes apart from the others; on
a noisy VM that moves a ratio by more than the 10% the decode target leaves. Here, for each
length, one passkey context is fed to a session per selector (and to dense attention where
it fits the model's 8K window), the floor's cache holds the context's first 512 tokens, and
then every method runs `--tokens` one-token forwards in turn (the same token ids for
every method: the context's own, from its start), for `--rounds` rounds. `--page-dtypes
auto model` adds a session per selector with its pages kept in float32 (the default, auto,
keeps a float32 model's pages in bfloat16), and
`--attention-dtypes bfloat16 model` one whose prefill attention takes float32 products
beside the default's bfloat16 ones (KVConfig.attention_dtype). Reports
the median ms per token of each method's rounds, its speed as a fraction of the floor's
(floor ms / method ms), and the median over rounds of that fraction taken within each round
(back-to-back turns: slow drifts of the machine cancel), side by side from the same
minutes. Writes a JSON file under benchmarks/results/ (or `--json`).

`--prefill-rounds N` then times prefill the same way: in each of N rounds every method reads
one 512-token chunk in turn (the floor a fresh 512-token context, dense a chunk on top of the
context, cut back after; each session the context's next chunk, so its depth grows by 512
a round), and the table gives tok/s as a fraction of the floor's.

    python benchmarks/decode_ratio.py --lengths 2k 8k 32k --rounds 7 --tokens 12
    python benchmarks/decode_ratio.py --lengths 32k 64k --rounds 0 --prefill-rounds 5
    python benchmarks/decode_ratio.py --rounds 0 --prefill-rounds 7 \
        --attention-dtypes bfloat16 model
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from decode_step import tiny_model, write_record  # the sibling script's (run from benchmarks/)
from transformers import DynamicCache

from memlayer import KVSession
from memlayer.kvretrieval.model import cache_argument, load_smollm2
from memlayer.kvretrieval.passkey import samples

LENGTHS = {"2k": 2000, "4k": 4000, "8k": 8000, "16k": 16000, "32k": 32000, "64k": 64000}
WINDOW = 8192  # SmolLM2's trained context: dense runs only below it
FLOOR_TOKENS = 512
CHUNK = 512  # tokens a prefill turn reads: KVConfig's default chunk, the floor's context


class Dense:
    """One-token forwards with transformers' own attention over a DynamicCache."""

    def __init__(self, model: Any, ids: list[int]):
        self.model = model
        self.cache = {cache_argument(model): DynamicCache(config=model.config)}
        model(torch.tensor([ids]), use_cache=True, logits_to_keep=1, **self.cache)
        self.next = iter(itertools.cycle(ids))

    def step(self) -> None:
        self.model(torch.tensor([[next(self.next)]]), use_cache=True, **self.cache)

    def chunk(self) -> None:
        """A 512-token chunk read on top of the cache, which is then cut back."""
        ids = [next(self.next) for _ in range(CHUNK)]
        self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1, **self.cache)
        next(iter(self.cache.values())).crop(-CHUNK)


class Floor(Dense):
    """The model floor: a 512-token context; its prefill reads a fresh one each time."""

    def chunk(self) -> None:
        cache = {cache_argument(self.model): DynamicCache(config=self.model.config)}
        ids = [next(self.next) for _ in range(CHUNK)]
        self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1, **cache)


class Memory:
    """One-token forwards through a KVSession (`feed` of one id: the forward `ask` decodes
    with)."""

    def __init__(self, model: Any, tokenizer: Any, ids: list[int], selector: str, **config: str):
        self.session = KVSession(
            model, tokenizer, chat=False, progress=False, selector=selector, **config
        )
        self.session.feed(ids)
        self.next = iter(itertools.cycle(ids))

    def step(self) -> None:
        self.session.feed([next(self.next)])

    def chunk(self) -> None:
        self.session.feed([next(self.next) for _ in range(CHUNK)])


def context_ids(tokenizer: Any, length: int) -> list[int]:
    """A passkey context's ids (random ids for the tiny model, which has no tokenizer)."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, 49152, (length,), generator=generator).tolist()
    context = samples(length, 1, seed=0)[0].context
    return list(tokenizer(context, add_special_tokens=False)["input_ids"])


def timed_rounds(methods: dict[str, Callable[[], None]], rounds: int, tokens: int) -> dict:
    """ms per token of each method's rounds, the methods taking turns in every round."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, step in methods.items():
            step()  # one untimed token: the turn's first forward pays for the switch
            started = time.perf_counter()
            for _ in range(tokens):
                step()
            times[name].append((time.perf_counter() - started) / tokens * 1e3)
    return times


def timed_chunks(methods: dict[str, Callable[[], None]], rounds: int) -> dict:
    """ms per token of each method's 512-token chunks, one chunk per method a round."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, chunk in methods.items():
            started = time.perf_counter()
            chunk()
            times[name].append((time.perf_counter() - started) / CHUNK * 1e3)
    return times


def ratio_rows(length: str, tokens: int, phase: str, times: dict) -> list[dict[str, Any]]:
    """Each method's median ms per token and its speed as a fraction of the floor's."""
    floor = statistics.median(times["floor"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append(
            {
                "length": length,
                "tokens": tokens,
                "phase": phase,
                "method": name,
                "median_ms": median,
                "min_ms": min(values),
                "ratio_to_floor": floor / median,
                "ratio_per_round": statistics.median(
                    f / v for f, v in zip(times["floor"], values, strict=True)
                ),
                "rounds_ms": values,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", nargs="+", choices=list(LENGTHS), default=["2k", "8k"])
    parser.add_argument("--selectors", nargs="+", default=["infllm", "quest"])
    parser.add_argument(
        "--page-dtypes",
        nargs="+",
        choices=["auto", "model", "bfloat16"],
        default=["auto"],
        help="one session per selector and page dtype (KVConfig.page_dtype)",
    )
    parser.add_argument(
        "--attention-dtypes",
        nargs="+",
        choices=["model", "bfloat16"],
        default=["bfloat16"],
        help="one session per selector and attention dtype (KVConfig.attention_dtype)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="decode rounds (0: none)")
    parser.add_argument("--tokens", type=int, default=12, help="decode tokens per turn")
    parser.add_argument(
        "--prefill-rounds", type=int, default=0, help="rounds of one 512-token chunk per method"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="random 2-layer model, no SmolLM2")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = (tiny_model(), None) if args.tiny else load_smollm2()
    rows = []
    print(
        "| length | phase | method | median ms/token | min | × floor (speed) "
        "| × floor, per round |\n|---|---|---|---|---|---|---|"
    )
    with torch.no_grad():
        for length in args.lengths:
            ids = context_ids(tokenizer, LENGTHS[length])
            runners: dict[str, Any] = {"floor": Floor(model, ids[:FLOOR_TOKENS])}
            if len(ids) < WINDOW:
                runners["dense"] = Dense(model, ids)
            for selector, page_dtype, attention_dtype in itertools.product(
                args.selectors, args.page_dtypes, args.attention_dtypes
            ):
                name = " ".join(
                    [selector]
                    + ([f"{page_dtype} pages"] if page_dtype != "auto" else [])
                    + (["f32 products"] if attention_dtype == "model" else [])
                )
                runners[name] = Memory(
                    model, tokenizer, ids, selector,
                    page_dtype=page_dtype, attention_dtype=attention_dtype,
                )  # fmt: skip
            phases = []
            if args.rounds:
                steps = {name: runner.step for name, runner in runners.items()}
                phases.append(("decode", timed_rounds(steps, args.rounds, args.tokens)))
            if args.prefill_rounds:
                chunks = {name: runner.chunk for name, runner in runners.items()}
                phases.append(("prefill", timed_chunks(chunks, args.prefill_rounds)))
            for phase, times in phases:
                for row in ratio_rows(length, len(ids), phase, times):
                    rows.append(row)
                    print(
                        f"| {length} | {phase} | {row['method']} | {row['median_ms']:.1f} | "
                        f"{row['min_ms']:.1f} | {row['ratio_to_floor']:.2f} | "
                        f"{row['ratio_per_round']:.2f} |",
                        flush=True,
                    )
            for runner in runners.values():
                if isinstance(runner, Memory):
                    runner.session.close()
    write_record("decode-ratio", args, rows)


if __name__ == "__main__":
    main()
