"""Writes from many threads of one `Memory` at once (as the HTTP service makes them): each is
stored once and searchable, on SQLite (serialized in the process) and PostgreSQL (not)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from memlayer import Memory


def test_threads_write_at_once(open_memory: Callable[..., Memory]) -> None:
    with open_memory(embedder="hash") as memory:

        def write(n: int) -> list[str]:
            items = [
                {"text": f"turn {n} {i} about window seats", "id": f"m{n}-{i}"} for i in range(3)
            ]
            ids = memory.add_many(items, tenant_id="acme", user_id=f"u{n % 4}")
            if n % 5 == 0:
                memory.delete(ids[0], tenant_id="acme", user_id=f"u{n % 4}")
                return ids[1:]
            return ids

        with ThreadPoolExecutor(8) as pool:
            kept = [rid for ids in pool.map(write, range(40)) for rid in ids]
        assert memory.count(tenant_id="acme") == len(kept) == 40 * 3 - 8
        assert {h.id for h in memory.get_many(kept, tenant_id="acme")} == set(kept)
        hits = memory.search("window seats", k=200, mode="vector", tenant_id="acme")
        assert {h.id for h in hits} == set(kept)
