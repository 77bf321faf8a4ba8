"""Page selectors: what a sealed page keeps as its summary, and how a chunk's queries score it.

A selector is a small dataclass, as a kvpress press is: its fields are its parameters,
`summary_rows` its summary's shape, `summarize` and `score` its method. A session copies the
selector once per layer, so an instance may also keep an index over its layer's pages: the
hooks `sealed`, `truncate`, `state` and `load_state` keep such an index in step with the
pages as they are sealed, dropped after a question, saved and loaded. A selector that
`selects_per_question` (RetroLM) instead chooses one set of pages per question for every
layer at once (`choose`, called by `memlayer.kvretrieval.question_pages`). Three more hooks
serve a selector that reorganises a fixed context (Squeezed Attention): `layout` regroups the
layer's sealed tokens into new pages once, `select` replaces top-k (it may keep fewer pages,
padding with -1), `calibrate` tunes it from sample queries. A new method is one
subclass; `SELECTORS.register(name)` makes it reachable by name (`KVSession(selector=name)`),
and an instance works without a name (`KVSession(selector=MySelector(...))`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from memlayer.errors import InvalidInputError
from memlayer.kernels import (
    score_pages,
    score_pages_summed,
    select_pages,
    select_pages_bounds,
    select_pages_summed,
)
from memlayer.registry import Registry


class PageLayout(NamedTuple):
    """Where a regroup puts a layer's sealed tokens: new pages, each holding per KV head the
    tokens `order` names (indices into the tokens regrouped, -1 for an unused row, a page's
    used rows first), `lengths` how many rows are used, and the new pages' summaries."""

    order: torch.Tensor  # [P, Hkv, S] long
    lengths: torch.Tensor  # [P, Hkv] long
    summaries: torch.Tensor  # [P, Hkv, R, D]


@dataclass
class PageSelector:
    """Builds page summaries and scores them against a chunk's queries (one layer's copy)."""

    name: ClassVar[str] = "custom"
    shares_selection: ClassVar[bool] = False  # True when every KV head gets the same pages
    # True: a question's pages are chosen once, from all layers' scores, and every layer
    # attends to them for the question and its answer (`choose`); `score` still selects
    # per layer and step while text is fed
    selects_per_question: ClassVar[bool] = False
    pads_selection: ClassVar[bool] = False  # True when `select` may leave -1 among its picks
    regroups: ClassVar[bool] = False  # True when `layout` lays a fixed context out anew
    calibrates: ClassVar[bool] = False  # True when `calibrate` uses sample queries
    # True when `select` scores a chunk with bfloat16 products if its queries come in
    # bfloat16 (a session with attention_dtype="bfloat16" then rounds them for it)
    takes_bf16_queries: ClassVar[bool] = False

    @property
    def summary_rows(self) -> int:
        """R: rows of head_dim each page's summary keeps per KV head."""
        raise NotImplementedError

    def summarize(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Summaries [N, Hkv, R, D] of N pages' keys [N, Hkv, S, D] sealed together, given the
        queries [Hq, T, D] of the chunk that pushed them out of the window."""
        raise NotImplementedError

    def score(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """Scores [1, Hkv, P] of pages (summaries [P, Hkv, R, D]) for queries [1, Hq, T, D]."""
        raise NotImplementedError

    def adopt_summaries(self, summaries: torch.Tensor) -> torch.Tensor:
        """Summaries [P, Hkv, R', D] saved by an earlier memlayer, in the shape `summarize`
        gives now (the default: unchanged)."""
        return summaries

    def choose(
        self, queries: list[torch.Tensor], summaries: list[torch.Tensor], k: int
    ) -> torch.Tensor:
        """For a selector that `selects_per_question`: the k pages [k] (ascending, on the
        summaries' device) that every layer attends to for a question, given each layer's
        question queries [1, Hq, T, D] (placed in the memory frame) and page summaries
        [P, Hkv, R, D]; 1 <= k <= P."""
        raise NotImplementedError

    def check_model(
        self, layers: int, kv_heads: int, head_dim: int, fingerprint: str | None = None
    ) -> None:
        """Refuse a model this selector cannot serve, before a session is built on it: an
        InvalidInputError for one of another geometry, a ModelMismatchError for one whose
        `fingerprint` (`memlayer.kvretrieval.model.fingerprint`; None: not known) is not the
        model a trained part was made for (e.g. RetroLM's trained retriever)."""

    def select(
        self, queries: torch.Tensor, summaries: torch.Tensor, topk: int, *, scale: float
    ) -> torch.Tensor:
        """Pages [1, Hkv, topk] a step attends to (ascending, -1 for none) for queries
        [1, Hq, T, D] placed in the memory frame, attention scaled by `scale`: by default
        the top-k of `score` (of its first head's row when every head shares the selection).
        Tensor operations only: a resident step reads nothing back."""
        scores = self.score(queries, summaries)
        if self.shares_selection:
            return select_pages(scores[:, :1], topk).expand(-1, scores.shape[1], -1)
        return select_pages(scores, topk)

    @property
    def decode_selection(self) -> str | None:
        """The C decode step's selection ("summed", "bounds") that is exactly this selector's
        `select`, so a layer may take its whole CPU decode step in one kernel call
        (`memlayer.kernels.decode_layer`); None: `select` runs as written."""
        return None

    def layout(
        self, keys: torch.Tensor, positions: torch.Tensor, page_size: int
    ) -> PageLayout | None:
        """New pages for a fixed context's sealed tokens, keys [Hkv, T, D] as memory stores
        them at absolute `positions` [T] (the selector indexes them as it lays them out);
        None: pages stay as sealed (the default)."""
        return None

    def check_layout(self) -> None:
        """Raise InvalidInputError, before anything changes, if `layout` cannot run now."""

    def calibrate(self, queries: torch.Tensor, *, scale: float) -> None:
        """Tune selection from sample query rows [Hkv, N, D] (placed in the memory frame)."""

    def stats(self) -> dict[str, float]:
        """Counters of this layer's selections, summed over layers by the session."""
        return {}

    def sealed(self, first: int, keys: torch.Tensor, summaries: torch.Tensor) -> None:
        """Pages `first` to `first + N - 1` were sealed: keys [N, Hkv, S, D] as memory stores
        them, and their summaries."""

    def truncate(self, count: int) -> None:
        """Pages from `count` on were dropped (those sealed while answering a question)."""

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save with the session (an index over the layer's pages, if any)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back what `state` returned, in a session loaded from disk."""

    def options(self) -> dict[str, Any]:
        """The fields that rebuild this selector by name: saved with the session."""
        return asdict(self)


SELECTORS: Registry[PageSelector] = Registry("selector")


class SummedScoreSelector(PageSelector):
    """A page summarized by one row per KV head, scored by the group's query · that row
    summed over the KV heads: one selection shared by every head (InfLLM, ReKV)."""

    shares_selection: ClassVar[bool] = True

    @property
    def summary_rows(self) -> int:
        return 1

    def score(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        summed = score_pages_summed(queries, summaries)
        return summed.expand(-1, summaries.shape[1], -1)

    def select(
        self, queries: torch.Tensor, summaries: torch.Tensor, topk: int, *, scale: float
    ) -> torch.Tensor:
        """The top-k of `score` in one kernel call (a decode step's selection on the CPU is
        one C call)."""
        chosen = select_pages_summed(queries, summaries, topk)
        return chosen.expand(-1, summaries.shape[1], -1)

    @property
    def decode_selection(self) -> str | None:
        return "summed" if type(self).select is SummedScoreSelector.select else None


@SELECTORS.register("infllm")
@dataclass
class InfLLMSelector(SummedScoreSelector):
    """InfLLM: a page is represented by the `repr_topk` keys the local window attended to most.

    Score = mean chunk query · mean representative key, summed over heads, so every head
    shares one selection. The score is linear in the representative keys, so a page keeps
    their mean (one row) and a step reads P rows instead of averaging P·repr_topk.
    """

    repr_topk: int = 4
    name: ClassVar[str] = "infllm"

    def __post_init__(self) -> None:
        if isinstance(self.repr_topk, bool) or not isinstance(self.repr_topk, int):
            raise InvalidInputError("repr_topk", "must be a positive integer", self.repr_topk)
        if self.repr_topk < 1:
            raise InvalidInputError("repr_topk", "must be a positive integer", self.repr_topk)

    def summarize(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        kv_heads, dim = keys.shape[1], keys.shape[-1]
        group_query = queries.float().reshape(kv_heads, -1, dim).mean(dim=1)
        attended = torch.einsum("gd,ngsd->ngs", group_query, keys.float())
        take = min(self.repr_topk, keys.shape[2])
        top = attended.topk(take, dim=-1).indices  # [N, Hkv, R]
        chosen = torch.gather(keys, 2, top.unsqueeze(-1).expand(-1, -1, -1, dim))
        return chosen.float().mean(dim=2, keepdim=True).to(keys.dtype)

    def adopt_summaries(self, summaries: torch.Tensor) -> torch.Tensor:
        """memlayer 0.2 kept the `repr_topk` keys themselves: their mean scores the same."""
        if summaries.shape[2] == 1:
            return summaries
        return summaries.float().mean(dim=2, keepdim=True).to(summaries.dtype)


@SELECTORS.register("quest")
@dataclass
class QuestSelector(PageSelector):
    """Quest: channel-wise min and max of a page's keys; score = upper bound of q·k, per KV head."""

    name: ClassVar[str] = "quest"
    takes_bf16_queries: ClassVar[bool] = True  # its chunk scores are a matmul per KV head

    @property
    def summary_rows(self) -> int:
        return 2

    def summarize(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return torch.stack([keys.amin(dim=2), keys.amax(dim=2)], dim=2)

    def score(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        return score_pages(queries, summaries, kind="bounds")

    def select(
        self, queries: torch.Tensor, summaries: torch.Tensor, topk: int, *, scale: float
    ) -> torch.Tensor:
        """The top-k of `score` per KV head, through one kernel call (one C call on a CPU
        decode step)."""
        return select_pages_bounds(queries, summaries, topk)

    @property
    def decode_selection(self) -> str | None:
        return "bounds" if type(self).select is QuestSelector.select else None


@SELECTORS.register("rekv")
@dataclass
class ReKVSelector(SummedScoreSelector):
    """ReKV: a page (one video frame's tokens) is represented by its mean key.

    Score = Σ over KV heads of the group's mean query · the page's mean key, so every head of
    a layer shares one selection: a frame is retrieved whole, for all heads at once.
    """

    name: ClassVar[str] = "rekv"

    def summarize(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return keys.float().mean(dim=2, keepdim=True).to(keys.dtype)


def resolve_selector(
    selector: str | PageSelector, options: dict[str, Any] | None = None
) -> PageSelector:
    """A selector instance: `selector` itself, or the one registered under that name."""
    if isinstance(selector, PageSelector):
        return selector
    try:
        return SELECTORS.create(selector, **(options or {}))
    except TypeError as exc:  # an option the selector does not have
        raise InvalidInputError("selector", f"{selector!r} does not take {options}") from exc
