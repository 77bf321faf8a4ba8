"""`PageStore`: pages kept in an ordered list of tiers, hot at the front, durable below.

`put` writes through to the first persistent tier (fsync'ed) before it returns, then
places the page in the front tier. `get` returns pages from the highest tier holding them
and promotes them to the front; pressure demotes the coldest one tier down (a page is
dropped only where a persistent tier below still holds it). `prefetch` starts promotion
on a worker thread (inside the front tier's `prefetching` context: on CUDA a side stream,
from pinned host memory) so `get` waits only for what has not arrived yet. Pages move only
through the `Tier` contract (`put_many`, `promote`, `touch`, `gather`), so any tier built
by `memlayer.stores.factory` works in any position.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from pydantic import ValidationError

from memlayer.errors import CapacityError, ClosedError, InvalidInputError, NotFoundError
from memlayer.stores.codec import check_payload
from memlayer.stores.factory import StoreConfig, build_tiers
from memlayer.stores.tier import Tier
from memlayer.types import Page

log = logging.getLogger(__name__)


class PageStore:
    """Moves pages between tiers; callers never need to know which tier holds a page."""

    def __init__(self, tiers: Sequence[Tier]):
        if not tiers:
            raise InvalidInputError("tiers", "must name at least one tier")
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise InvalidInputError("tiers", "names must be unique", names)
        last = tiers[-1]
        if not last.persistent and last.budget is not None:
            raise InvalidInputError(
                "tiers", "the last tier must be persistent (disk, sql) or have no budget"
            )
        self.tiers = list(tiers)
        self._durable = next((t for t in self.tiers if t.persistent), None)
        self._lock = threading.RLock()
        self._pending: dict[str, Future[None]] = {}
        # one intra-op thread for copies: a second OpenMP team would fight the caller's compute
        self._worker = ThreadPoolExecutor(
            1,
            thread_name_prefix="memlayer-prefetch",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        self._moved: dict[str, dict[str, float]] = defaultdict(
            lambda: {"pages": 0, "bytes": 0, "seconds": 0.0}
        )
        self._closed = False

    @classmethod
    def open(
        cls, config: StoreConfig | Mapping[str, Any] | None = None, **options: Any
    ) -> PageStore:
        """A store whose tiers `build_tiers` makes from a `StoreConfig` (or its fields as a
        dict / keywords)."""
        if not isinstance(config, StoreConfig):
            try:
                config = StoreConfig(**{**(config or {}), **options})
            except ValidationError as exc:
                error = exc.errors()[0]
                field = ".".join(str(part) for part in error["loc"]) or "config"
                raise InvalidInputError(field, error["msg"]) from exc
        return cls(build_tiers(config))

    # -- writes ---------------------------------------------------------------------------

    def put(self, page: Page) -> None:
        """Store a page; durable (when a persistent tier exists) once this returns."""
        self.put_many([page])

    def put_many(self, pages: Sequence[Page]) -> None:
        """Store pages with one durable write (one fsync or one transaction)."""
        for page in pages:
            check_payload(page)
            if not any(tier.accepts(page) for tier in self.tiers):
                raise InvalidInputError("page.payload", "no tier of this store can hold bytes")
            for tier in self.tiers:
                if tier.accepts(page) and tier.budget is not None and page.nbytes > tier.budget:
                    raise CapacityError(
                        f"page {page.id!r} needs {page.nbytes} bytes; "
                        f"tier {tier.name!r} budget is {tier.budget}"
                    )
        with self._lock:
            self._check_open()
            for page in pages:
                self._drop_volatile(page.id)
            if self._durable is not None:
                self._durable.put_many(pages)
            by_level: dict[int, list[Page]] = {}
            for page in pages:
                by_level.setdefault(self._front_for(page), []).append(page)
            for level, placed in by_level.items():
                if not self.tiers[level].persistent:
                    self._demote(level, self.tiers[level].put_many(placed))

    def delete(self, page_id: str) -> None:
        """Remove a page from every tier (durably first)."""
        with self._lock:
            self._check_open()
            holders = [t for t in self.tiers if page_id in t]
            if not holders:
                raise NotFoundError("page", page_id)
            for tier in sorted(holders, key=lambda t: not t.persistent):
                tier.evict(page_id)

    # -- reads ----------------------------------------------------------------------------

    def __contains__(self, page_id: object) -> bool:
        with self._lock:
            return any(page_id in tier for tier in self.tiers)

    def __len__(self) -> int:
        return len(self.ids())

    def ids(self) -> set[str]:
        """Every stored page id."""
        with self._lock:
            if self._durable is not None:
                return set(self._durable.ids())
            return {pid for tier in self.tiers for pid in tier.ids()}

    def get(self, page_ids: str | Iterable[str]) -> list[Page]:
        """Pages in the order asked, promoted to the front tier; NotFoundError if any is unknown."""
        ids = [page_ids] if isinstance(page_ids, str) else list(page_ids)
        for page_id in ids:
            self._wait(page_id)
        with self._lock:
            self._check_open()
            for page_id in ids:
                self._level(page_id)  # every id known before anything moves
            pages = []
            for page_id in ids:
                level = self._level(page_id)  # promotions above may have moved it
                for above in self.tiers[:level]:
                    above.counters.misses += 1
                page = self.tiers[level].get(page_id)
                front = self._front_for(page)
                if level > front:
                    self._move(page, self.tiers[level], front)
                pages.append(page)
            return pages

    def gather(self, page_ids: Sequence[str], name: str) -> torch.Tensor:
        """Tensor `name` of many pages stacked [n, *shape] from the front tier (a tensor
        tier reads them with one gather per slab)."""
        for page_id in page_ids:
            self._wait(page_id)
        with self._lock:
            self._bring_up(page_ids, "gather")
            return self.tiers[0].gather(page_ids, name)

    def bring_up(self, page_ids: Sequence[str]) -> None:
        """Make these pages resident in the front tier together, as `gather` does before it
        reads them (for a caller that reads the front tier's memory itself)."""
        for page_id in page_ids:
            self._wait(page_id)
        with self._lock:
            self._bring_up(page_ids, "bring_up")

    def wait(self, page_ids: Iterable[str] | None = None) -> None:
        """Wait until prefetches of these pages (of every page: None) have finished."""
        if page_ids is None:
            with self._lock:
                futures = set(self._pending.values())
            for future in futures:
                future.result()
            return
        for page_id in page_ids:
            self._wait(page_id)

    def prefetch(self, page_ids: Iterable[str]) -> Future[None]:
        """Start bringing pages to the front tier; `get` and `gather` wait for them."""
        ids = [pid for pid in page_ids if pid not in self.tiers[0]]
        with self._lock:
            self._check_open()
            future = self._worker.submit(self._prefetch, ids)
            for page_id in ids:
                self._pending[page_id] = future
        return future

    # -- inspection and lifetime ----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Pages, bytes and hit rate per tier; pages, bytes and seconds moved per direction."""
        with self._lock:
            result = {
                "tiers": {tier.name: tier.stats() for tier in self.tiers},
                "moved": {k: dict(v) for k, v in self._moved.items()},
            }
        log.debug("memlayer page store stats: %s", result)
        return result

    def close(self) -> None:
        """Finish prefetches and close every tier; later calls raise ClosedError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._worker.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> PageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("page store")

    def _wait(self, page_id: str) -> None:
        future = self._pending.get(page_id)
        if future is not None:
            future.result()

    def _level(self, page_id: str) -> int:
        for level, tier in enumerate(self.tiers):
            if page_id in tier:
                return level
        raise NotFoundError("page", page_id)

    def _front_for(self, page: Page) -> int:
        return next(i for i, tier in enumerate(self.tiers) if tier.accepts(page))

    def _drop_volatile(self, page_id: str) -> None:
        for tier in self.tiers:
            if not tier.persistent and page_id in tier:
                tier.evict(page_id)

    def _place(self, page: Page, level: int) -> None:
        """Put a page at `level`; what that evicts moves one tier down (demotion)."""
        tier = self.tiers[level]
        if tier.persistent or page.id in tier:
            return
        self._demote(level, tier.put(page))

    def _demote(self, level: int, victims: Sequence[Page]) -> None:
        """Move pages evicted from `level` to the next tier that takes them, unless durable:
        each tier's share as one batch (what that evicts moves on down the same way)."""
        below: dict[int, list[Page]] = {}
        for victim in victims:
            target = next(
                (i for i in range(level + 1, len(self.tiers)) if self.tiers[i].accepts(victim)),
                None,
            )
            if target is not None and not self.tiers[target].persistent:
                below.setdefault(target, []).append(victim)
        for target, pages in below.items():
            started = time.perf_counter()
            tier = self.tiers[target]
            self._demote(target, tier.put_many([page for page in pages if page.id not in tier]))
            nbytes = sum(page.nbytes for page in pages)
            self._count(self.tiers[level], tier, len(pages), nbytes, started)

    def _move(self, page: Page, source: Tier, level: int) -> None:
        started = time.perf_counter()
        self._place(page, level)
        self._count(source, self.tiers[level], 1, page.nbytes, started)

    def _count(self, source: Tier, target: Tier, pages: int, nbytes: int, started: float) -> None:
        stats = self._moved[f"{source.name}->{target.name}"]
        stats["pages"] += pages
        stats["bytes"] += nbytes
        stats["seconds"] += time.perf_counter() - started

    def _bring_up(self, page_ids: Sequence[str], caller: str) -> None:
        """Pages in the front tier mark as used (kept while the rest come up); the rest are
        promoted, each tier's as one batch. CapacityError when they do not fit at once."""
        self._check_open()
        front = self.tiers[0]
        front.touch([pid for pid in page_ids if pid in front])
        self._promote([pid for pid in page_ids if pid not in front])
        if any(pid not in front for pid in page_ids):
            raise CapacityError(
                f"{caller} of {len(page_ids)} pages does not fit tier {front.name!r} "
                f"(budget {front.budget} bytes); {caller} fewer pages at a time"
            )

    def _promote(self, page_ids: Sequence[str], *, missing_ok: bool = False) -> None:
        """Bring pages toward the front, the deepest tier's first, each tier's as one batch."""
        levels: dict[str, int] = {}
        for page_id in dict.fromkeys(page_ids):
            try:
                levels[page_id] = self._level(page_id)
            except NotFoundError:
                if not missing_ok:
                    raise  # else deleted after a prefetch asked for it
        while levels:
            deepest = max(levels.values())
            batch = [page_id for page_id, level in levels.items() if level == deepest]
            if deepest > 0:
                self._promote_from(deepest, batch)
            levels = {  # demotions above may have pushed a page down
                page_id: level if page_id in self.tiers[level] else self._level(page_id)
                for page_id, level in levels.items()
                if level != deepest
            }

    def _promote_from(self, level: int, page_ids: list[str]) -> None:
        """Copy pages held at `level` into the first tier above it that accepts them (never
        into a persistent one: what it holds it got from `put`), demoting what makes room."""
        source = self.tiers[level]
        for target_level, target in enumerate(self.tiers[:level]):
            if target.persistent or not page_ids:
                return
            refused: list[str] = []
            started = time.perf_counter()
            for step in target.promote(source, page_ids):
                self._demote(target_level, step.evicted)
                if step.arrived:
                    self._count(source, target, len(step.arrived), step.nbytes, started)
                refused.extend(step.refused)
                started = time.perf_counter()
            page_ids = refused

    def _prefetch(self, page_ids: Sequence[str]) -> None:
        try:
            with self._lock, self.tiers[0].prefetching():
                self._promote(page_ids, missing_ok=True)
        finally:
            with self._lock:
                for page_id in page_ids:
                    self._pending.pop(page_id, None)
