"""Where RetroLM's rankings put the page holding the answer: every planted fact of
`retrolm_eval.py`'s evaluation context, training-free and with trained retriever files.

`retrolm_eval.py` asks a few questions and reports whether the answer's page was among the
top-k; this gives the rank (0 = first) of that page for every fact of the same context (same
seed and settings), from the same retrieval pass, so rankings can be compared on more than a
handful of answers without generating any.

    python benchmarks/retrolm_ranks.py --retrievers channels.safetensors heads.safetensors
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from memlayer import KVSession
from memlayer.kvretrieval.model import load_smollm2
from memlayer.kvretrieval.page_retriever import PageRetriever
from memlayer.kvretrieval.retrolm import training_free_scores
from memlayer.retrolm_training import DEFAULT_CONFIG, planted_contexts, retrieval_examples


def rank_of(scores: torch.Tensor, answer: int) -> int:
    """How many pages score above the answer's page."""
    return int((scores > scores[answer]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=8000)
    parser.add_argument("--facts", type=int, default=8)
    parser.add_argument("--retrievers", nargs="*", type=Path, default=[])
    parser.add_argument("--topk", type=int, default=DEFAULT_CONFIG["topk"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    model, tokenizer = load_smollm2()
    context = planted_contexts(tokenizer, model, 1, args.eval_tokens, args.facts, 1000, "eval")[0]
    session = KVSession(model, tokenizer, selector="retrolm", chat=False, progress=False)
    examples = retrieval_examples(session, context)
    pages = examples[0].pages.shape[1]
    rankers = {"training-free": lambda q, p: training_free_scores(q, p)}
    for path in args.retrievers:
        scorer = PageRetriever.load(path)
        rankers[f"{path.name} ({scorer.kind})"] = scorer.scores
    print(f"{len(context.ids)} tokens, {pages} pages, {len(examples)} facts in sealed pages")
    print("| ranking | rank of the answer's page, per fact | mean rank | recall@k |")
    print("|---|---|---|---|")
    for name, rank in rankers.items():
        ranks = [rank_of(rank(e.question, e.pages), e.answer) for e in examples]
        hits = sum(r < args.topk for r in ranks)
        print(
            f"| {name} | {', '.join(map(str, ranks))} | {sum(ranks) / len(ranks):.1f} | "
            f"{hits}/{len(ranks)} |"
        )


if __name__ == "__main__":
    main()
