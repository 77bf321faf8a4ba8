"""Page selectors: what a page keeps as its summary, and how a query scores it.

Each selector is a small dataclass registered by name (`infllm`, `quest`); a new method
subclasses `PageSelector` and overrides `summarize` and `score`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from memlayer.errors import InvalidInputError
from memlayer.kernels import score_pages


@dataclass
class PageSelector:
    """Builds page summaries and scores them against a chunk's queries."""

    name = "base"
    shares_selection = False  # True when every KV head gets the same pages

    def summarize(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Summary [Hkv, R, D] of one page's keys [Hkv, S, D], given recent queries [Hq, T, D]."""
        raise NotImplementedError

    def score(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """Scores [1, Hkv, P] of pages (summaries [P, Hkv, R, D]) for queries [1, Hq, T, D]."""
        raise NotImplementedError


@dataclass
class InfLLMSelector(PageSelector):
    """InfLLM: a page is represented by the keys the local window attended to most.

    Score = mean chunk query · mean representative key, summed over heads, so every head
    shares one selection.
    """

    repr_topk: int = 4
    name = "infllm"
    shares_selection = True

    def summarize(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        kv_heads = keys.shape[0]
        group_query = queries.float().reshape(kv_heads, -1, keys.shape[-1]).mean(dim=1)
        attended = torch.einsum("gd,gsd->gs", group_query, keys.float())
        take = min(self.repr_topk, keys.shape[1])
        top = attended.topk(take, dim=-1).indices  # [Hkv, R]
        return torch.gather(keys, 1, top.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))

    def score(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        per_head = score_pages(queries, summaries, kind="repr")
        return per_head.sum(dim=1, keepdim=True).expand_as(per_head)


@dataclass
class QuestSelector(PageSelector):
    """Quest: channel-wise min and max of a page's keys; score = upper bound of q·k, per KV head."""

    name = "quest"

    def summarize(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return torch.stack([keys.amin(dim=1), keys.amax(dim=1)], dim=1)

    def score(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        return score_pages(queries, summaries, kind="bounds")


SELECTORS: dict[str, Callable[..., PageSelector]] = {
    InfLLMSelector.name: InfLLMSelector,
    QuestSelector.name: QuestSelector,
}


def make_selector(name: str, *, repr_topk: int) -> PageSelector:
    """The selector registered under `name`."""
    if name == InfLLMSelector.name:
        return InfLLMSelector(repr_topk=repr_topk)
    factory = SELECTORS.get(name)
    if factory is None:
        raise InvalidInputError("selector", f"must be one of {sorted(SELECTORS)}", name)
    return factory()
