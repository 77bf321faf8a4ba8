"""One long fixed context, many questions: a KVContext encoded once against re-prefill each time.

The context is real prose (Python's own help topics, `pydoc_data.topics`, which ships with
Python) with short facts planted at depths spread 5-95%: "The access code of section Amber
is Amber-4821." Each question asks for one code and is answered from the context by
SmolLM2-135M (chat=False, greedy), its cue ending where the fact's code starts ("... is
Amber-"): the only place in the context where the section's name is followed by a dash is its
fact, so a model that reads the right page copies the code (with the bare "is 4821" form,
SmolLM2 took a neighbouring fact's code for 4 of 10 questions even at 2K tokens, dense).
Side by side in one run, on the same token ids:

- `dense`: the whole context and the question through the model's own attention, every
  question re-prefilled (only where the context fits the 8K trained window);
- each selector of `--selectors` (`infllm`, `quest`; any registered name): the context
  encoded once with `KVContext.encode`, closed, reopened with `KVContext.open` (fresh
  objects, no model run over the context), and every question asked by a new
  `KVSession(context=ctx)`; against it, `--reprefill` questions asked by a plain `KVSession`
  fed the whole context first (re-prefill), whose answers must agree.

Measured per method: accuracy; the share of the context's KV (pages x KV heads) one step
reads, from the session's stats; the share of the context's pages any question read; time to
first token (TTFT: the question's forward, plus the context's prefill when re-prefilled, plus
the open for the first question on a reopened context); bytes per tier; and the time until
the N-th question's first token, encode once + open vs re-prefill each time. Every run writes
its rows, the command, the date and the machine to a JSON file under benchmarks/results/.

    python benchmarks/shared_context.py --tokens 16000 --questions 10 --selectors infllm quest
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from memlayer import KVContext, KVSession
from memlayer.kvretrieval.model import cache_argument, load_smollm2

WINDOW = 8192
RESULTS = Path(__file__).parent / "results"
NAMES = (
    *("Amber", "Basalt", "Cobalt", "Dune", "Ember", "Fjord", "Garnet", "Harbor", "Indigo"),
    *("Juniper", "Kestrel", "Lagoon", "Meadow", "Nimbus", "Onyx", "Prairie", "Quartz", "Raven"),
    *("Sierra", "Tundra", "Umber", "Violet", "Willow", "Xenon", "Yarrow", "Zephyr"),
)


@dataclass(frozen=True)
class Question:
    """A planted fact's question, the code it asks for, and the depth it was planted at."""

    section: str
    code: str
    depth: float

    @property
    def text(self) -> str:
        return (
            f"What is the access code of section {self.section}? "
            f"The access code of section {self.section} is {self.section}-"
        )


def build_context(tokenizer: Any, tokens: int, count: int, seed: int) -> tuple[str, list[Question]]:
    """About `tokens` tokens of help-topic prose (whole paragraphs, topics in name order) with
    `count` facts planted at depths spread from 5% to 95%, each at a paragraph break."""
    from pydoc_data.topics import topics

    if count > len(NAMES):
        raise SystemExit(f"at most {len(NAMES)} questions")
    rng = random.Random(seed)
    sections = rng.sample(NAMES, count)
    depths = [0.05 + 0.9 * i / max(count - 1, 1) for i in range(count)]
    questions = [
        Question(section, str(rng.randint(1000, 9999)), depth)
        for section, depth in zip(sections, depths, strict=True)
    ]
    facts = [f"The access code of section {q.section} is {q.section}-{q.code}." for q in questions]
    room = tokens - sum(len(ids_of(tokenizer, fact)) + 2 for fact in facts)
    paragraphs: list[str] = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            paragraph = paragraph.strip()
            size = len(ids_of(tokenizer, paragraph)) + 2 if paragraph else 0
            if size and size <= room:
                paragraphs.append(paragraph)
                room -= size
        if room < 64:
            break
    for fact, question in sorted(zip(facts, questions, strict=True), key=lambda f: -f[1].depth):
        paragraphs.insert(int(question.depth * len(paragraphs)), fact)  # deepest first
    return "\n\n".join(paragraphs), questions


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def question_ids(tokenizer: Any, question: Question) -> list[int]:
    """The question as `KVSession.ask` runs it (chat=False): a newline, then the question."""
    return ids_of(tokenizer, "\n") + ids_of(tokenizer, question.text)


def correct(answer: str, question: Question) -> bool:
    return question.code in answer


def run_dense(model: Any, tokenizer: Any, context: list[int], questions, args) -> dict[str, Any]:
    """Every question re-prefills the whole context through the model's own attention."""
    hits, ttfts = 0, []
    for question in questions:
        cache = DynamicCache(config=model.config)
        pass_cache = {cache_argument(model): cache}
        ids = context + question_ids(tokenizer, question)
        with torch.no_grad():
            started = time.perf_counter()
            out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1, **pass_cache)
            token = int(out.logits[0, -1].argmax())
            ttfts.append(time.perf_counter() - started)
            tokens = []
            while len(tokens) < args.new_tokens and token != tokenizer.eos_token_id:
                tokens.append(token)
                out = model(torch.tensor([[token]]), use_cache=True, **pass_cache)
                token = int(out.logits[0, -1].argmax())
        hits += correct(tokenizer.decode(tokens), question)
    return {
        "method": "dense",
        "correct": hits,
        "questions": len(questions),
        "read_per_step": 1.0,
        "touched_fraction": 1.0,
        "reprefill_ttft_s": statistics.median(ttfts),
    }


def kv_config(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        n_init=args.n_init,
        n_local=args.n_local,
        block_size=args.block_size,
        topk=args.topk,
        chunk_size=args.chunk_size,
    )


def run_selector(
    model: Any, tokenizer: Any, context: list[int], questions, selector: str, args, folder: Path
) -> dict[str, Any]:
    """Encode once, reopen, ask every question from a new session on the context; re-prefill
    a plain session for the first `--reprefill` questions."""
    path = folder / selector
    started = time.perf_counter()
    encoded = KVContext.encode(
        context,
        model,
        tokenizer,
        path=path,
        selector=selector,
        chat=False,
        progress=False,
        **kv_config(args),
    )
    encode_s = time.perf_counter() - started
    encoded.close()

    ctx = KVContext.open(path, model, tokenizer)  # fresh objects: nothing of the encoding
    hits, ttfts, reads, answers = 0, [], [], []
    for question in questions:
        with KVSession(context=ctx, progress=False) as session:
            answer = session.ask(question.text, max_new_tokens=args.new_tokens)
            stats = session.stats()
        answers.append(answer)
        hits += correct(answer, question)
        ttfts.append(stats["prefill_s"])  # the question's forward: the first token's logits
        reads.append(stats["context_read_per_step"])
    context_stats = ctx.stats()
    first_ttft = ctx.open_s + ttfts[0]  # the first question pays the open and its page reads

    reprefill, agree = [], 0
    for question, answer in zip(questions[: args.reprefill], answers, strict=False):
        plain = KVSession(
            model, tokenizer, selector=selector, chat=False, progress=False, **kv_config(args)
        )
        plain.feed(context)
        again = plain.ask(question.text, max_new_tokens=args.new_tokens)
        reprefill.append(plain.stats()["prefill_s"])  # the context's and the question's
        agree += again == answer
        plain.close()
    ctx.close()
    row = {
        "method": selector,
        "correct": hits,
        "questions": len(questions),
        "read_per_step": statistics.median(reads),
        "touched_fraction": context_stats["touched_fraction"],
        "context_pages": context_stats["pages"],
        "encode_s": encode_s,
        "open_s": context_stats["open_s"],
        "first_ttft_s": first_ttft,
        "ttft_s": statistics.median(ttfts),
        "reprefill_ttft_s": statistics.median(reprefill) if reprefill else None,
        "reprefill_agree": f"{agree}/{len(reprefill)}",
        "bytes": context_stats["bytes"],
    }
    if reprefill:
        row["reopened_speedup"] = row["reprefill_ttft_s"] / first_ttft
        n = len(questions)
        row["n_questions_s"] = {
            "context": encode_s + ctx.open_s + sum(ttfts),
            "reprefill": n * row["reprefill_ttft_s"],
        }
    return row


def machine() -> dict[str, object]:
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(path: Path | None, args: argparse.Namespace, rows: list[dict]) -> Path:
    """The rows so far with the command, date, settings and machine; returns where (the same
    file for every call of one run)."""
    now = datetime.datetime.now().astimezone()
    if path is None:
        args.json = path = RESULTS / f"shared-context-{now:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": shlex.join(["python", "benchmarks/shared_context.py", *sys.argv[1:]]),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def tiny_model() -> Any:
    """A 2-layer Llama with random weights and SmolLM2's vocabulary: smoke-tests the script."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16000, help="context length in tokens")
    parser.add_argument(
        "--questions", type=int, default=10, help="planted facts, one question each"
    )
    parser.add_argument("--selectors", nargs="+", default=["infllm", "quest"])
    parser.add_argument(
        "--dense",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="dense re-prefill too, where the context fits the 8K window",
    )
    parser.add_argument(
        "--reprefill",
        type=int,
        default=2,
        help="questions also asked of a plain session fed the whole context",
    )
    parser.add_argument("--n-local", type=int, default=512)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-init", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a 2-layer random model (SmolLM2's tokenizer): smoke-tests the script",
    )
    parser.add_argument("--json", type=Path, help="where to write the run")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    model, tokenizer = load_smollm2()
    if args.tiny:
        model = tiny_model()
    text, questions = build_context(tokenizer, args.tokens, args.questions, args.seed)
    context = ids_of(tokenizer, text)
    print(
        f"context: {len(context)} tokens, {len(questions)} planted facts; "
        f"span per step: {args.n_init + args.topk * args.block_size + args.n_local} tokens",
        flush=True,
    )
    rows = []
    print(
        "| method | accuracy | read/step | pages touched | encode s | open s | "
        "TTFT reopened s | TTFT s | re-prefill TTFT s | speedup | agree |",
        flush=True,
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    if args.dense:
        if len(context) + 64 > WINDOW:
            print(f"| dense | out of window ({len(context)} > {WINDOW}) | | | | | | | | | |")
        else:
            row = run_dense(model, tokenizer, context, questions, args)
            rows.append(row)
            write_json(args.json, args, rows)
            print(
                f"| dense | {row['correct']}/{row['questions']} | 100% | 100% | | | | | "
                f"{row['reprefill_ttft_s']:.2f} | | |",
                flush=True,
            )
    with tempfile.TemporaryDirectory(prefix="shared-context-") as folder:
        for selector in args.selectors:
            row = run_selector(model, tokenizer, context, questions, selector, args, Path(folder))
            rows.append(row)
            write_json(args.json, args, rows)  # each method's row kept as soon as it is done
            print(
                f"| {selector} | {row['correct']}/{row['questions']} | "
                f"{row['read_per_step']:.1%} | {row['touched_fraction']:.0%} | "
                f"{row['encode_s']:.1f} | {row['open_s']:.2f} | {row['first_ttft_s']:.2f} | "
                f"{row['ttft_s']:.2f} | {fmt(row['reprefill_ttft_s'], '.1f')} | "
                f"{fmt(row.get('reopened_speedup'), '.0f')}x | {row['reprefill_agree']} |",
                flush=True,
            )
    for row in rows:
        if "bytes" in row:
            mib = {tier: f"{b / 2**20:.1f} MiB" for tier, b in row["bytes"].items()}
            print(f"{row['method']} bytes per tier: {mib}")
        if "n_questions_s" in row:
            n = row["n_questions_s"]
            print(
                f"{row['method']}: {row['questions']} questions' first tokens: encode once + open "
                f"{n['context']:.1f} s vs re-prefill each {n['reprefill']:.1f} s"
            )
    print(f"wrote {write_json(args.json, args, rows)}")


if __name__ == "__main__":
    main()
