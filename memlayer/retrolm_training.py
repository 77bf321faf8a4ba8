"""Training RetroLM's page retriever: planted-fact pairs from a model's own KV memory.

For each generated context (`memlayer.kvretrieval.planted`) a `KVSession` with the `retrolm`
selector feeds it; each planted fact's question goes through the retrieval pass (the queries
the selector would rank pages with) and becomes an example: the question's features, the
context's page features, and the page holding the answer. `train_retriever_file` builds the
pairs, trains `PageRetriever` for a fixed number of steps with a fixed seed (CPU, minutes for
SmolLM2) and writes the safetensors file that `RetroLMSelector(retriever=...)` loads.
"""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memlayer.errors import InvalidInputError
from memlayer.kv_session import KVSession

DEFAULT_CONFIG: dict[str, Any] = {"n_init": 64, "n_local": 512, "block_size": 64, "topk": 4}


def answer_page(session: KVSession, position: int) -> int | None:
    """The index of the sealed page holding token `position` (None: a sink or the window)."""
    pages = session.cache.memories[0].pages
    index = bisect.bisect_right(pages.starts, position) - 1
    if index < 0 or position >= pages.starts[index] + session.config.block_size:
        return None
    return index


def retrieval_examples(session: KVSession, context: Any) -> list[Any]:
    """Feed `context` (a `PlantedContext`) into a fresh `session` and make one
    `RetrievalExample` per fact whose answer lies in a sealed page."""
    from memlayer.kvretrieval.page_retriever import RetrievalExample
    from memlayer.kvretrieval.question_pages import page_summaries, question_queries
    from memlayer.kvretrieval.retrolm import page_features, question_features

    if session.tokens_fed:
        raise InvalidInputError("session", "must be fresh (nothing fed)")
    session.feed(context.ids)
    summaries = page_summaries(session.cache)
    pages = page_features(summaries)
    examples = []
    for fact in context.facts:
        page = answer_page(session, fact.position)
        if page is None:
            continue
        queries = question_queries(
            session.cache, functools.partial(session._forward, fact.question_ids)
        )
        questions = question_features(queries, summaries[0].shape[1])
        examples.append(RetrievalExample(questions, pages, page))
    return examples


def collect(model: Any, tokenizer: Any, contexts: Sequence[Any], **config: Any) -> list[Any]:
    """Retrieval examples of every context, each fed into its own `retrolm` session."""
    examples = []
    for context in contexts:
        session = KVSession(
            model,
            tokenizer,
            selector="retrolm",
            chat=False,
            progress=False,
            **{**DEFAULT_CONFIG, **config},
        )
        examples += retrieval_examples(session, context)
    return examples


def planted_contexts(
    tokenizer: Any, model: Any, count: int, tokens: int, facts: int, seed: int, split: str
) -> list[Any]:
    """`count` planted-fact contexts: prose from `split`'s topics with a tokenizer, random
    token ids (the model's vocabulary) without one."""
    from memlayer.kvretrieval.planted import text_context, token_context

    if tokenizer is None:
        vocab = model.config.get_text_config().vocab_size
        return [token_context(vocab, tokens, facts, seed + i) for i in range(count)]

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return [text_context(encode, tokens, facts, seed + i, split) for i in range(count)]  # type: ignore[arg-type]


def train_retriever_file(
    out: str | os.PathLike[str],
    model: Any = None,
    tokenizer: Any = None,
    *,
    contexts: int = 12,
    tokens: int = 2000,
    facts: int = 8,
    steps: int = 300,
    seed: int = 0,
    rank: int = 32,
    layers: tuple[float, float] = (0.0, 1.0),
    kind: str = "channels",
    **config: Any,
) -> tuple[Path, list[float]]:
    """Build pairs from `contexts` training contexts (topics disjoint from the evaluation
    half), train a page retriever for `steps` steps with `seed`, write it to `out` (with
    the model's fingerprint: sessions on another model refuse it); returns the file and the
    loss per step. `kind`: the scorer's features (`PageRetriever`: `channels`, or `heads`,
    one weight per layer and KV head over the training-free ranking's z-scores). `model`
    None: SmolLM2-135M-Instruct."""
    from memlayer.kvretrieval.model import fingerprint, load_smollm2
    from memlayer.kvretrieval.page_retriever import PageRetriever, train
    from memlayer.kvretrieval.retrolm import layer_band

    for field, value in (("contexts", contexts), ("tokens", tokens), ("facts", facts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(field, "must be a positive integer", value)
    if model is None:
        model, tokenizer = load_smollm2()
    chosen = planted_contexts(tokenizer, model, contexts, tokens, facts, seed, "train")
    examples = collect(model, tokenizer, chosen, **config)
    if not examples:
        raise InvalidInputError("tokens", "no fact landed in a sealed page: use longer contexts")
    total, kv_heads, head_dim = examples[0].question.shape
    band = layer_band(total, layers)
    retriever = PageRetriever.create(
        total,
        kv_heads,
        head_dim,
        first=band.start,
        last=band.stop,
        rank=rank,
        seed=seed,
        fingerprint=fingerprint(model),  # the file is refused for any other model
        kind=kind,
    )
    losses = train(retriever, examples, steps=steps, seed=seed)
    return retriever.save(out), losses
