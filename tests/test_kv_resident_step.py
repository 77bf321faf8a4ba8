"""A KV step with its pages in the front tier never reads a value back to the host.

Reading a device value on the host (`.item()`, `.tolist()`, `bool(t)`, `nonzero`,
`unique`...) is a synchronisation on a GPU and a break in any captured graph. On CPU the
proofs are: one layer's resident attention compiles as a single graph, and whole forward
passes (chunks that seal pages, one-token decode steps) run under a torch function mode
that fails on every such read. tests/test_kv_cuda.py repeats it with CUDA's sync checker.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from kv_models import tiny
from torch.overrides import TorchFunctionMode

from memlayer import KVSession

SMALL = dict(n_init=2, n_local=8, block_size=4, topk=2, chunk_size=8)
HOST_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}
HOST_READS |= {"nonzero", "unique", "unique_consecutive"}  # output size read from the device


class NoHostReads(TorchFunctionMode):
    """Fails on any torch call that brings a tensor's value to the host."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in HOST_READS:
            raise AssertionError(f"host read: {func.__name__}")
        return func(*args, **(kwargs or {}))


@contextmanager
def no_host_reads() -> Iterator[None]:
    with NoHostReads():
        yield


def _ids(n: int, seed: int = 5) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("selector", ["infllm", "quest"])
def test_resident_attention_of_a_layer_compiles_as_one_graph(selector: str) -> None:
    session = KVSession(tiny("llama"), None, progress=False, selector=selector, **SMALL)
    session.feed(_ids(80))
    memory = session.cache.memories[1]
    assert memory.pages.count >= 8 and memory.sinks.count == 2
    memory.append(torch.randn(2, 1, 16), torch.randn(2, 1, 16))
    query = torch.randn(1, 4, 1, 16)
    eager = memory.attend_resident(query, 0.25)
    torch._dynamo.reset()
    compiled = torch.compile(memory.attend_resident, fullgraph=True, backend="eager")
    assert torch.equal(compiled(query, 0.25), eager)


def test_a_branch_on_a_device_value_breaks_the_graph_so_the_compile_check_can_fail() -> None:
    """(dynamo traces `.item()` and `nonzero` into the graph: the function mode catches those.)"""

    def branches(x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x

    def lists(x: torch.Tensor) -> torch.Tensor:
        return x[x.tolist()[:1]]

    for reads_back in (branches, lists):
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.Unsupported):
            torch.compile(reads_back, fullgraph=True, backend="eager")(torch.ones(3))


@pytest.mark.parametrize("selector", ["infllm", "quest"])
def test_prefill_and_decode_forwards_read_nothing_back(selector: str) -> None:
    session = KVSession(tiny("llama"), None, progress=False, selector=selector, **SMALL)
    session.feed(_ids(40))
    pages = session.stats()["pages"]
    chunks, tokens = _ids(24, seed=6), _ids(12, seed=7)
    with no_host_reads():
        session._forward(chunks)  # three chunks, each sealing pages
        for token in tokens:  # decode: one token per forward, seals every 4
            session._forward([token])
    assert session.stats()["pages"] > pages


def test_a_bounded_front_tier_reads_the_selection_back_once_per_step(tmp_path: Path) -> None:
    """With a RAM budget, pages may be below the front tier: the step must know which."""
    session = KVSession(
        tiny("llama"),
        None,
        progress=False,
        ram_budget="4KiB",
        offload_path=tmp_path / "offload",
        **SMALL,
    )
    session.feed(_ids(60))
    token = _ids(1)
    with pytest.raises(AssertionError, match="host read: tolist"), no_host_reads():
        session._forward(token)
