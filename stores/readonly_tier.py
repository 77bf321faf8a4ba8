"""A read-only tier: a fixed set of pages that many stores (and processes) read, none writes.

A fixed KV context keeps its pages in a disk folder or a database that every process opening
it shares. Put under the front tiers of a store, this tier serves those pages on demand and
takes nothing: `accepts` is False for every page, so a `PageStore` never writes a page here
(a session's own pages go to a tier above) and never demotes a page into it (a page evicted
above is dropped there, since this tier still holds it). It is not `persistent` for the same
reason: the store's durable writes go elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Protocol

from memlayer.errors import InvalidInputError, NotFoundError
from memlayer.stores.tier import Tier
from memlayer.types import Page


class PageSource(Protocol):
    """Where the pages are read from: a disk tier, or a database's saved pages."""

    def get_many(self, page_ids: Sequence[str]) -> list[Page]: ...


class ReadOnlyTier(Tier):
    """The pages `ids` of `source`, read on demand and never written.

    `page_bytes` is the payload size of one page (they all have one shape), so `nbytes`
    reports the pages' bytes without asking the source (a database table may hold other
    pages too). The source stays open on `close`: whoever opened it closes it.
    """

    persistent = False  # takes no writes: a store's durable writes go to a tier above

    def __init__(
        self, source: PageSource, ids: Collection[str], *, page_bytes: int, name: str = "context"
    ):
        super().__init__()
        self.name = name
        self.budget = None
        self._source = source
        self._ids = frozenset(ids)
        self._page_bytes = page_bytes

    def accepts(self, page: Page) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return len(self._ids) * self._page_bytes

    def __contains__(self, page_id: object) -> bool:
        return page_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> Iterator[str]:
        return iter(self._ids)

    def get(self, page_id: str) -> Page:
        return self.get_many([page_id])[0]

    def get_many(self, page_ids: Sequence[str], *, transient: bool = False) -> list[Page]:
        missing = [page_id for page_id in page_ids if page_id not in self._ids]
        if missing:
            self.counters.misses += len(missing)
            raise NotFoundError("page", missing[0])
        source = self._source
        pages = (
            source.get_many(page_ids, transient=transient)
            if isinstance(source, Tier)
            else source.get_many(page_ids)
        )
        self.counters.hits += len(page_ids)
        return [
            dataclasses.replace(page, id=pid) for page, pid in zip(pages, page_ids, strict=True)
        ]

    def read_many_into(
        self,
        page_ids: Sequence[str],
        destinations: Callable[[str, Any], Mapping[str, memoryview] | None],
    ) -> list[Page | Exception | None]:
        """The source's `read_many_into` (a disk tier reads straight into a RAM slab); all
        None, so the caller reads the pages with `get`, when the source has none."""
        read = getattr(self._source, "read_many_into", None)
        if read is None:
            return [None] * len(page_ids)
        missing = [page_id for page_id in page_ids if page_id not in self._ids]
        if missing:
            self.counters.misses += len(missing)
            raise NotFoundError("page", missing[0])
        results: list[Page | Exception | None] = read(page_ids, destinations)
        self.counters.hits += sum(isinstance(result, Page) for result in results)
        return results

    def put(self, page: Page) -> list[Page]:
        raise InvalidInputError("page", f"tier {self.name!r} is read-only", page.id)

    def evict(self, page_id: str) -> None:
        raise InvalidInputError("page_id", f"tier {self.name!r} is read-only", page_id)

    def close(self) -> None:
        """Nothing to release: the source belongs to whoever opened it."""
