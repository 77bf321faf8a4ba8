"""KVSession on a CUDA model: the Triton kernels, the GPU front tier and bf16, end to end.

The CPU suite proves the paged memory equals dense attention with the torch reference
kernels; these repeat the proofs where a user's model lives, on the GPU, where attention
goes through the Triton kernels and pages move between GPU, RAM and disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kv_models import EXACT, steps_without_host_sync, tiny, twin

from memlayer import KVSession

pytestmark = pytest.mark.gpu

SMALL = dict(n_init=2, n_local=8, block_size=4, topk=2, chunk_size=8)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("selector", ["infllm", "quest"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "llama-yarn"])
def test_float32_session_on_cuda_equals_dense(family: str, selector: str) -> None:
    # float32 pools take Triton's exact (ieee) dots: only the summation order differs
    dense = tiny(family).cuda()
    ids = _ids(90, seed=3)
    with torch.no_grad():
        expected = dense(torch.tensor([ids], device="cuda")).logits[0]
        prompt = torch.tensor([ids], device="cuda")
        continuation = dense.generate(prompt, max_new_tokens=8, do_sample=False)[0, 90:].tolist()

    session = KVSession(twin(dense), None, progress=False, selector=selector, **EXACT)
    logits = session._forward(ids, all_logits=True)
    assert logits.is_cuda and session.stats()["pages"] > 0
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    session = KVSession(twin(dense), None, progress=False, selector=selector, **EXACT)
    session.feed(ids)
    assert session.continue_ids([], 8) == continuation


def test_triton_and_reference_kernels_agree_inside_a_bf16_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # bf16 operands: the two kernel paths round differently, within bf16's few ulps
    model = tiny("llama").to("cuda", torch.bfloat16)
    ids = _ids(200, seed=4)
    triton_logits = KVSession(twin(model), None, progress=False, **SMALL)._forward(
        ids, all_logits=True
    )
    monkeypatch.setenv("MEMLAYER_KERNELS", "reference")
    reference_logits = KVSession(twin(model), None, progress=False, **SMALL)._forward(
        ids, all_logits=True
    )
    assert torch.isfinite(triton_logits).all()
    assert _relative(triton_logits, reference_logits) < 1e-2


def test_gpu_budget_spills_to_ram_and_disk_and_reads_back(tmp_path: Path) -> None:
    model = tiny("llama").cuda()
    resident = KVSession(twin(model), None, progress=False, **SMALL)
    tiered = KVSession(
        twin(model),
        None,
        progress=False,
        gpu_budget="4KiB",
        ram_budget="4KiB",
        offload_path=tmp_path / "offload",
        **SMALL,
    )
    for session in (resident, tiered):
        session.feed(_ids(160, seed=5))
    question = _ids(6, seed=6)
    assert tiered.continue_ids(question, 8) == resident.continue_ids(question, 8)
    stats = tiered.stats()
    tiers = stats["tiers"]
    assert tiers["gpu"]["bytes"] <= 4096 and tiers["ram"]["bytes"] <= 4096
    assert tiers["disk"]["pages"] == stats["pages"] > tiers["gpu"]["pages"] > 0
    moved = stats["moved"]
    assert sum(moved.get(f"{deep}->gpu", {"pages": 0})["pages"] for deep in ("ram", "disk")) > 0
    assert any((tmp_path / "offload").glob("segment-*.log"))


@pytest.mark.parametrize("selector", ["infllm", "quest"])
def test_resident_layer_steps_never_synchronize_with_the_host(selector: str) -> None:
    """Chunks that seal pages and one-token steps of a layer whose pages are all on the GPU
    run with CUDA's sync checker set to fail on any synchronisation."""
    model = tiny("llama").to("cuda", torch.bfloat16)
    session = KVSession(model, None, progress=False, selector=selector, **SMALL)
    session.feed(_ids(60, seed=5))
    memory = session.cache.memories[0]
    pages = memory.pages.count
    steps = [8] * 3 + [1] * 12  # three chunks, then decode steps (a seal every 4)
    outputs = steps_without_host_sync(memory, steps, torch.bfloat16)
    assert memory.pages.count > pages
    assert all(bool(out.isfinite().all()) for out in outputs)


@pytest.mark.parametrize("chunk_size", [8, 64])  # the decode-shaped and the prefill paths
def test_bfloat16_pages_under_a_float32_cuda_model_are_dense_within_bfloat16(
    chunk_size: int,
) -> None:
    """Triton dots bfloat16 pages against float32 queries in float32: within bfloat16's
    rounding of the keys and values, not of the queries too."""
    dense = tiny("llama").cuda()
    ids = _ids(150, seed=3)
    with torch.no_grad():
        expected = dense(torch.tensor([ids], device="cuda")).logits[0]
    config = {**EXACT, "chunk_size": chunk_size, "page_dtype": "bfloat16"}
    session = KVSession(twin(dense), None, progress=False, **config)
    logits = session._forward(ids, all_logits=True)
    pages = session.cache.memories[0].pages
    slab = pages.front.slab(pages.signature)
    assert slab is not None and slab.fields["k"].dtype == torch.bfloat16 and logits.is_cuda
    error = (logits - expected).abs().max().item()
    assert 0 < error < 2**-7 * expected.abs().max().item()


def test_bfloat16_pages_step_without_host_synchronisation() -> None:
    model = tiny("llama").cuda()
    session = KVSession(model, None, progress=False, page_dtype="bfloat16", **SMALL)
    session.feed(_ids(60, seed=5))
    memory = session.cache.memories[0]
    outputs = steps_without_host_sync(memory, [8] * 2 + [1] * 8)
    assert all(out.dtype == torch.float32 and bool(out.isfinite().all()) for out in outputs)
