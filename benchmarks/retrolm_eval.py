"""Planted-fact recall with SmolLM2-135M: InfLLM, Quest and RetroLM (training-free, trained).

Contexts are prose (Python's documentation topics, `pydoc_data.topics`) with `--facts`
facts planted at spread depths, each about its own subject ("The amber heron's secret
number is 40317."); a question names one subject. The trained retriever is trained first on
contexts from the other half of the topics (disjoint from the evaluation contexts), or read
from `--retriever`. Every method answers the same questions with the same settings; the
two RetroLM rows share one feed (the same pages and summaries: only the ranking at question
time differs).

Reported per method: accuracy (the number in the answer); `answer page`: the share of
(question, layer) pairs whose attended pages included the page holding the answer;
`pages/layer`: the distinct context pages a layer attended to over a question's forward and
its decode steps (the answer's own pages left out), averaged over layers and questions.
Rows, settings, the command, the date and the machine go to a JSON file under
benchmarks/results/ (or `--json`).

    python benchmarks/retrolm_eval.py --eval-tokens 8000 --eval-contexts 1
    python benchmarks/retrolm_eval.py --tiny   # a tiny random model, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from passkey import machine

from memlayer import KVSession
from memlayer.kvretrieval.retrolm import RetroLMSelector
from memlayer.retrolm_training import answer_page, planted_contexts, train_retriever_file

RESULTS = Path(__file__).parent / "results"
METHODS = ["infllm", "quest", "retrolm", "retrolm-trained"]


def tiny_model() -> Any:
    """A tiny random Llama (no tokenizer: token-id contexts), for the smoke test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    return LlamaForCausalLM(config).eval()


class SelectionLog:
    """Records, per layer, the distinct pages each step attended to (host reads: a
    benchmark's bookkeeping, not part of the measured method)."""

    def __init__(self, session: KVSession):
        self.pages: list[set[int]] = [set() for _ in session.cache.memories]
        for memory, seen in zip(session.cache.memories, self.pages, strict=True):
            select = memory.select

            def logged(
                q: torch.Tensor, scale: float | None = None, select: Any = select, seen: Any = seen
            ) -> torch.Tensor:
                chosen = select(q, scale)
                seen.update(i for i in chosen.flatten().tolist() if i >= 0)
                return chosen

            memory.select = logged  # type: ignore[method-assign]

    def reset(self) -> None:
        for seen in self.pages:
            seen.clear()


def ask(session: KVSession, fact: Any, new_tokens: int) -> str:
    if fact.question is not None:
        return session.ask(fact.question, max_new_tokens=new_tokens)
    return " ".join(map(str, session.continue_ids(fact.question_ids, new_tokens)))


def evaluate(
    model: Any, tokenizer: Any, contexts: list[Any], retriever: Path | None, args: Any
) -> list[dict[str, Any]]:
    """Every method over every context's asked facts: accuracy, answer page hits, pages."""
    config = {
        "n_init": args.n_init,
        "n_local": args.n_local,
        "block_size": args.block_size,
        "topk": args.topk,
    }
    totals = {m: {"correct": 0, "asked": 0, "hits": 0.0, "pages": 0.0, "s": 0.0} for m in METHODS}
    context_pages = []
    for context in contexts:
        feeds = {m: [m] for m in ("infllm", "quest")}
        feeds["retrolm"] = [m for m in ("retrolm", "retrolm-trained") if m in args.methods]
        for selector, methods in feeds.items():
            methods = [m for m in methods if m in args.methods]
            if not methods:
                continue
            session = KVSession(
                model, tokenizer, selector=selector, chat=False, progress=False, **config
            )
            started = time.perf_counter()
            session.feed(context.ids)
            fed = time.perf_counter()
            print(
                f"  fed {len(context.ids)} tokens ({selector}) in {fed - started:.0f} s", flush=True
            )
            count = session.cache.memories[0].pages.count
            context_pages.append(count)
            log = SelectionLog(session)
            facts = [f for f in context.facts if answer_page(session, f.position) is not None]
            step = max(len(facts) // args.questions, 1)
            asked = facts[::step][: args.questions]
            for method in methods:
                if method == "retrolm-trained":
                    session.selector = RetroLMSelector(retriever=str(retriever))
                for fact in asked:
                    log.reset()
                    started = time.perf_counter()
                    answer = ask(session, fact, args.new_tokens)
                    row = totals[method]
                    row["s"] += time.perf_counter() - started
                    row["asked"] += 1
                    row["correct"] += fact.answer in answer
                    page = answer_page(session, fact.position)
                    layers = [{i for i in seen if i < count} for seen in log.pages]
                    row["hits"] += sum(page in seen for seen in layers) / len(layers)
                    row["pages"] += sum(len(seen) for seen in layers) / len(layers)
                print(
                    f"  {method}: {row['correct']}/{row['asked']} so far "
                    f"({time.perf_counter() - fed:.0f} s since the feed ended)",
                    flush=True,
                )
    rows = []
    for method in args.methods:
        row = totals[method]
        asked = row["asked"] or 1
        rows.append(
            {
                "method": method,
                "correct": row["correct"],
                "asked": row["asked"],
                "answer_page_attended": row["hits"] / asked,
                "pages_per_layer": row["pages"] / asked,
                "context_pages": max(context_pages),
                "s_per_question": row["s"] / asked,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--eval-contexts", type=int, default=1)
    parser.add_argument("--eval-tokens", type=int, default=8000)
    parser.add_argument("--facts", type=int, default=8, help="facts planted per context")
    parser.add_argument("--questions", type=int, default=4, help="facts asked per context")
    parser.add_argument("--train-contexts", type=int, default=6)
    parser.add_argument("--train-tokens", type=int, default=1500)
    parser.add_argument("--train-facts", type=int, default=12)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=16, help="0: no bilinear term")
    parser.add_argument(
        "--kind",
        choices=["channels", "heads"],
        default="channels",
        help="the trained scorer's features: a weight per channel (plus the bilinear term), "
        "or one per layer and KV head over the training-free z-scores",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retriever", type=Path, help="a trained file: skip training")
    parser.add_argument("--save-retriever", type=Path, help="where to keep the trained file")
    parser.add_argument("--n-local", type=int, default=512)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-init", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--json", type=Path, help="where to write the run")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    if args.tiny:
        model, tokenizer = tiny_model(), None
    else:
        from memlayer.kvretrieval.model import load_smollm2

        model, tokenizer = load_smollm2()
    config = {
        "n_init": args.n_init,
        "n_local": args.n_local,
        "block_size": args.block_size,
        "topk": args.topk,
    }
    training: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        retriever = args.retriever
        if retriever is None and "retrolm-trained" in args.methods:
            started = time.perf_counter()
            target = args.save_retriever or Path(scratch) / "retriever.safetensors"
            retriever, losses = train_retriever_file(
                target,
                model,
                tokenizer,
                contexts=args.train_contexts,
                tokens=args.train_tokens,
                facts=args.train_facts,
                steps=args.steps,
                seed=args.seed,
                rank=args.rank,
                kind=args.kind,
                **config,
            )
            training = {
                "seconds": time.perf_counter() - started,
                "loss_first10": sum(losses[:10]) / len(losses[:10]),
                "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
            }
            print(
                f"trained in {training['seconds']:.0f} s: InfoNCE loss "
                f"{training['loss_first10']:.2f} -> {training['loss_last10']:.2f}",
                flush=True,
            )
        contexts = planted_contexts(
            tokenizer, model, args.eval_contexts, args.eval_tokens, args.facts, 1000, "eval"
        )
        rows = evaluate(model, tokenizer, contexts, retriever, args)
    print(
        f"context: {len(contexts[0].ids)} tokens; topk {args.topk} of {args.block_size}-token pages"
    )
    print("| method | accuracy | answer page attended | pages/layer | of pages | s/question |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['correct']}/{row['asked']} | "
            f"{row['answer_page_attended']:.2f} | {row['pages_per_layer']:.1f} | "
            f"{row['context_pages']} | {row['s_per_question']:.1f} |"
        )
    now = datetime.datetime.now().astimezone()
    path = args.json or RESULTS / f"retrolm-{now:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": shlex.join(["python", "benchmarks/retrolm_eval.py", *sys.argv[1:]]),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "training": training,
        "rows": rows,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
