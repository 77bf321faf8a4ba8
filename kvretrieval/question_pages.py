"""One page selection per question, shared by every layer (RetroLM-style retrieval).

Per-step selectors choose pages in each layer at each step. A selector that
`selects_per_question` instead sees the question first: a **retrieval pass** runs the
question through the model attending to the sink tokens and the local window alone (no
pages), recording each layer's queries in the memory frame; the memory is then restored, so
the pass leaves nothing. The selector turns those queries and every layer's page summaries
into one set of k pages, which is **pinned** in every layer (a fixed [1, Hkv, k] tensor on
the device) for the real forward of the question and all of its decode steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from memlayer.kvretrieval.cache import PagedKVCache
from memlayer.kvretrieval.selectors import PageSelector


def question_queries(cache: PagedKVCache, run: Callable[[], object]) -> list[torch.Tensor]:
    """The retrieval pass: `run` forwards the question with no pages attended; returns each
    layer's question queries [1, Hq, T, D] (memory frame). The memory is restored after."""
    state = cache.checkpoint()
    try:
        with cache.recording() as recorded, cache.selecting(0):
            run()
    finally:
        cache.restore(state)
    return [torch.cat(steps, dim=2) for steps in recorded]


def page_summaries(cache: PagedKVCache) -> list[torch.Tensor]:
    """Every layer's page summaries [P, Hkv, R, D] (views)."""
    return [memory.pages.summaries[: memory.pages.count] for memory in cache.memories]


@contextmanager
def _pinned_for(
    cache: PagedKVCache, selector: PageSelector, run: Callable[[], object]
) -> Iterator[None]:
    pages = cache.memories[0].pages.count
    if pages == 0:  # nothing to retrieve: the answer's own pages, as they are sealed
        chosen = torch.empty(0, dtype=torch.long, device=cache.memories[0].pages.table.device)
    else:
        queries = question_queries(cache, run)
        chosen = selector.choose(queries, page_summaries(cache), min(cache.config.topk, pages))
    with cache.pinned(chosen):
        yield


def question_pages(
    cache: PagedKVCache, selector: PageSelector, run: Callable[[], object] | None
) -> AbstractContextManager[None]:
    """A block in which every layer attends to the pages `selector` chose for the question
    that `run` forwards (after a retrieval pass), when the selector `selects_per_question`
    and there is a question; otherwise a block that changes nothing."""
    if not selector.selects_per_question or run is None:
        return nullcontext()
    return _pinned_for(cache, selector, run)
