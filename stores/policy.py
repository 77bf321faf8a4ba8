"""Which page a tier gives up first when it needs room: LRU or LFU, chosen by name."""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Protocol

from memlayer.registry import Registry


class EvictionPolicy(Protocol):
    """Tracks uses of the ids a tier holds and names the coldest."""

    def touch(self, page_id: str) -> None: ...
    def remove(self, page_id: str) -> None: ...
    def victim(self) -> str | None: ...


POLICIES: Registry[EvictionPolicy] = Registry("policy")


@POLICIES.register("lru")
class LRU:
    """Least recently used first."""

    def __init__(self) -> None:
        self.order: OrderedDict[str, None] = OrderedDict()

    def touch(self, page_id: str) -> None:
        self.order[page_id] = None
        self.order.move_to_end(page_id)

    def remove(self, page_id: str) -> None:
        self.order.pop(page_id, None)

    def victim(self) -> str | None:
        return next(iter(self.order), None)


@POLICIES.register("lfu")
class LFU(LRU):
    """Least frequently used first; ties go to the least recently used."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: Counter[str] = Counter()

    def touch(self, page_id: str) -> None:
        self.uses[page_id] += 1
        super().touch(page_id)

    def remove(self, page_id: str) -> None:
        self.uses.pop(page_id, None)
        super().remove(page_id)

    def victim(self) -> str | None:
        fewest = min(self.uses.values(), default=None)
        return next((pid for pid in self.order if self.uses[pid] == fewest), None)
