"""One layer's sealed pages: summaries resident for scoring, keys and values in the PageStore.

Selection reads only the summaries; the payloads of the pages that win are gathered from
whichever tier holds them (GPU, RAM, or offloaded to disk) into one stacked tensor per step.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from memlayer.errors import InvalidInputError
from memlayer.kvretrieval.config import KVConfig
from memlayer.stores import PageStore
from memlayer.types import Page


def open_kv_store(
    config: KVConfig, device: torch.device, page_bytes: int, step_pages: int
) -> tuple[PageStore, tempfile.TemporaryDirectory[str] | None]:
    """The session's page store (and the temporary offload folder it owns, if any): a tier
    on the model's device when it is a GPU, RAM, then, when RAM is bounded or `offload_path`
    is given, a disk tier there (or in a temporary folder) that does not fsync.

    Each bounded front tier must hold the `step_pages` pages one layer's step gathers.
    """
    cuda = device.type == "cuda"
    if config.gpu_budget is not None and not cuda:
        raise InvalidInputError("gpu_budget", "needs a model on a CUDA device")
    need = step_pages * page_bytes
    for field, budget in (("gpu_budget", config.gpu_budget), ("ram_budget", config.ram_budget)):
        if budget is not None and budget < need:
            raise InvalidInputError(
                field,
                f"must hold the {step_pages} pages one step attends to: {need} bytes "
                f"(one page is {page_bytes} bytes)",
                budget,
            )
    tiers: list[dict[str, Any]] = []
    if cuda:
        tiers.append(
            {"kind": "tensor", "name": "gpu", "device": device, "budget": config.gpu_budget}
        )
    tiers.append({"kind": "tensor", "name": "ram", "device": "cpu", "budget": config.ram_budget})
    owned = None
    if config.offload_path is not None or config.ram_budget is not None:
        folder = config.offload_path
        if folder is None:
            owned = tempfile.TemporaryDirectory(prefix="memlayer-kv-")
            folder = Path(owned.name)
        # offload is a cache (save() is durable), so its writes are not fsync'ed
        tiers.append({"kind": "disk", "path": folder, "sync": False})
    return PageStore.open(tiers=tiers), owned


class SealedPages:
    """Sealed pages of one layer; page `i` is stored as `{prefix}/{i}` with tensors k and v."""

    def __init__(
        self,
        store: PageStore,
        prefix: str,
        summary_shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.store = store
        self.prefix = prefix
        self.summaries = torch.empty(0, *summary_shape, dtype=dtype, device=device)
        self.starts: list[int] = []
        self.gathered = 0  # pages gathered for attention
        self.front_hits = 0  # of those, pages already in the front tier

    @property
    def count(self) -> int:
        """Pages sealed so far."""
        return len(self.starts)

    def page_id(self, index: int) -> str:
        """The store id of page `index`."""
        return f"{self.prefix}/{index}"

    def extend(
        self, keys: torch.Tensor, values: torch.Tensor, summaries: torch.Tensor, starts: list[int]
    ) -> None:
        """Seal pages: keys/values [N, Hkv, S, D] to the store in one batch, summaries
        [N, Hkv, R, D] kept here, `starts` their first tokens' absolute positions."""
        first, count = self.count, len(starts)
        self.store.put_many(
            [
                Page(id=self.page_id(first + i), payload={"k": keys[i], "v": values[i]})
                for i in range(count)
            ]
        )
        needed = first + count
        if needed > self.summaries.shape[0]:
            grown = self.summaries.new_empty(
                (max(16, needed, 2 * self.summaries.shape[0]), *self.summaries.shape[1:])
            )
            grown[:first] = self.summaries[:first]
            self.summaries = grown
        self.summaries[first:needed] = summaries
        self.starts.extend(starts)

    def gather(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of pages `indices` stacked [n, Hkv, S, D] on the front tier."""
        ids = [self.page_id(i) for i in indices]
        front = self.store.tiers[0]
        self.front_hits += sum(page_id in front for page_id in ids)
        self.gathered += len(ids)
        return self.store.gather(ids, "k"), self.store.gather(ids, "v")

    def truncate(self, count: int) -> None:
        """Forget pages from index `count` on (their payloads leave the store)."""
        for index in range(count, self.count):
            self.store.delete(self.page_id(index))
        del self.starts[count:]
