"""The `Tier` interface: one level of storage under a byte budget, and its counters."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

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


class Tier(ABC):
    """put / get / evict / contains under a byte budget (None: unbounded).

    `put` returns the pages it evicted to make room, so the caller can demote them.
    A persistent tier keeps what `put` acknowledged across crashes and restarts.
    """

    name: str
    budget: int | None
    persistent: bool = False

    def __init__(self) -> None:
        self.counters = TierCounters()

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
