"""The `Tier` contract: one level of storage under a byte budget, and its counters.

A tier implements `put / get / evict / __contains__ / ids / nbytes / close`; batch writes,
batch reads, tensor gathers and promotion from another tier come with generic defaults
built on those, which a tier overrides where it can do the same work faster. `PageStore`
moves pages only through this contract, so a new tier is one subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from memlayer.errors import InvalidInputError
from memlayer.types import Page


@dataclass
class TierCounters:
    """Hits and misses of `get` on one tier (a miss is a lookup it could not serve)."""

    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class PromotionStep:
    """One step of `Tier.promote`: the pages that arrived and their bytes, the pages evicted
    to make room for them (for the caller to demote before the next step) and the pages the
    tier refused because it does not `accept` their payload."""

    arrived: list[str]
    nbytes: int
    evicted: list[Page] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class Tier(ABC):
    """put / get / evict / contains under a byte budget (None: unbounded).

    `put` and `put_many` return the pages they evicted to make room, so the caller can
    demote them. A persistent tier keeps what `put` acknowledged across crashes and restarts.
    """

    name: str
    budget: int | None
    persistent: bool = False

    def __init__(self) -> None:
        self.counters = TierCounters()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Tier:
        """The tier `cls(**options)`: the factory a tier kind is registered with (see
        `memlayer.stores.factory`), taking the options as one mapping because `name` is
        both a tier option and `Registry.create`'s first parameter."""
        return cls(**options)

    @abstractmethod
    def put(self, page: Page) -> list[Page]: ...

    @abstractmethod
    def get(self, page_id: str) -> Page: ...

    @abstractmethod
    def evict(self, page_id: str) -> None: ...

    @abstractmethod
    def __contains__(self, page_id: object) -> bool: ...

    @abstractmethod
    def ids(self) -> Iterator[str]: ...

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes this tier holds (for tensor tiers: bytes reserved on its device)."""

    def accepts(self, page: Page) -> bool:
        """Whether this tier can hold this kind of payload at all."""
        return True

    def __len__(self) -> int:
        return sum(1 for _ in self.ids())

    @abstractmethod
    def close(self) -> None:
        """Release files, connections and memory."""

    # -- batches: generic defaults, overridden where a tier does better -----------------

    def put_many(self, pages: Sequence[Page]) -> list[Page]:
        """Store pages as one write; the pages evicted to make room. The default puts them
        one by one; a persistent tier makes them durable together (one fsync, one
        transaction) before it returns."""
        evicted: list[Page] = []
        for page in pages:
            evicted.extend(self.put(page))
        return evicted

    def get_many(self, page_ids: Sequence[str], *, transient: bool = False) -> list[Page]:
        """The pages in the order asked; NotFoundError for the first one not held here.

        `transient`: the caller copies the payloads at once and never writes to them, so a
        tier may return views of its own memory (that stay valid while referenced) instead
        of copies. The default reads them one by one with `get`.
        """
        return [self.get(page_id) for page_id in page_ids]

    def gather(self, page_ids: Sequence[str], name: str) -> torch.Tensor:
        """Tensor `name` of many pages stacked [len(ids), *shape]. The default stacks what
        `get_many` reads; a tier holding pages in shared slabs reads them as one gather."""
        if not page_ids:
            raise InvalidInputError("page_ids", "must name at least one page")
        tensors = []
        for page in self.get_many(page_ids, transient=True):
            if isinstance(page.payload, (bytes, bytearray)) or name not in page.payload:
                raise InvalidInputError("name", f"is not a tensor of page {page.id!r}", name)
            tensors.append(page.payload[name])
        return torch.stack(tensors)

    def touch(self, page_ids: Sequence[str]) -> None:
        """Count a use of pages held here, so eviction takes them last (a gather keeps the
        pages it already has while the rest come up). The default reads them, since a read
        is a use; a tier that orders eviction without reading overrides this."""
        self.get_many(page_ids, transient=True)

    def promote(self, source: Tier, page_ids: Sequence[str]) -> Iterator[PromotionStep]:
        """Copy pages that `source` (a lower tier) holds into this one, step by step.

        Lazy: each step runs when the caller asks for it, so the caller demotes a step's
        evicted pages before the next step and memory stays within budgets. Pages this tier
        does not accept are refused, for the caller to offer lower down; the source keeps
        every page. The default reads the batch from `source` at once (`get_many`,
        transient) and puts its pages one per step.
        """
        for page in source.get_many(page_ids, transient=True):
            if self.accepts(page):
                yield PromotionStep([page.id], page.nbytes, self.put(page))
            else:
                yield PromotionStep([], 0, refused=[page.id])

    def prefetching(self) -> AbstractContextManager[None]:
        """The context promotions ahead of use run in (on the store's worker thread); the
        pages are complete in this tier when it exits. The default adds nothing."""
        return nullcontext()

    def stats(self) -> dict[str, float | int | str | None]:
        """Pages, bytes, budget and hit rate as plain values."""
        return {
            "pages": len(self),
            "bytes": self.nbytes,
            "budget": self.budget,
            "hits": self.counters.hits,
            "misses": self.counters.misses,
            "hit_rate": self.counters.hit_rate,
        }
