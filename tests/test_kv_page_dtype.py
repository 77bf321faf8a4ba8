"""Pages kept in bfloat16 under a float32 model (`page_dtype="bfloat16"`): half the bytes in
every tier, the same answers through offload, save/load and a fixed context, and attention
within bfloat16's rounding of the keys and values of dense attention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kv_models import tiny, twin

from memlayer import InvalidInputError, KVContext, KVSession

SMALL = dict(n_init=2, n_local=8, block_size=4, topk=2, chunk_size=8)
# every page selected at its true position: attention over the whole past, as dense
EXACT = dict(n_init=3, n_local=8, block_size=4, topk=1000, positions="exact")


def _ids(n: int, seed: int = 5) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _session(model: Any, **config: Any) -> KVSession:
    return KVSession(twin(model), None, progress=False, **{**SMALL, **config})


@pytest.mark.parametrize("selector", ["infllm", "quest"])
def test_bfloat16_pages_take_half_the_bytes_and_are_read_as_bfloat16(selector: str) -> None:
    model = tiny("llama")
    wide = _session(model, selector=selector, page_dtype="model")
    narrow = _session(model, selector=selector, page_dtype="bfloat16")
    for session in (wide, narrow):
        session.feed(_ids(120))
    pages = narrow.cache.memories[0].pages
    slab = pages.front.slab(pages.signature)
    assert slab is not None and slab.fields["k"].dtype == torch.bfloat16
    assert pages.summaries.dtype == torch.float32  # scoring stays in the model's dtype
    assert narrow.stats()["pages"] == wide.stats()["pages"] > 0
    assert narrow.stats()["tiers"]["ram"]["bytes"] * 2 == wide.stats()["tiers"]["ram"]["bytes"]


@pytest.mark.parametrize("chunk_size", [8, 64])  # prefill steps of few queries, and flash
def test_attention_over_bfloat16_pages_is_dense_within_bfloat16_rounding(chunk_size: int) -> None:
    dense = tiny("llama")
    ids = torch.randint(0, 96, (1, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = dense(ids).logits[0]
    logits = {}
    for page_dtype in ("model", "bfloat16"):
        session = KVSession(
            twin(dense),
            None,
            progress=False,
            chunk_size=chunk_size,
            page_dtype=page_dtype,
            **EXACT,
        )
        logits[page_dtype] = session._forward(ids[0].tolist(), all_logits=True)
        assert session.stats()["pages"] > 0
    torch.testing.assert_close(logits["model"], expected, rtol=1e-5, atol=1e-5)
    error = (logits["bfloat16"] - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert 0 < error < 2**-7 * scale  # rounded (not float32), within bfloat16's 8-bit mantissa


def test_offloaded_bfloat16_pages_give_identical_outputs(tmp_path: Path) -> None:
    model = tiny("llama")
    resident = _session(model, page_dtype="bfloat16")
    offloaded = _session(
        model, page_dtype="bfloat16", ram_budget="2KiB", offload_path=tmp_path / "offload"
    )
    for session in (resident, offloaded):
        session.feed(_ids(120))
    assert offloaded.continue_ids(_ids(6, seed=3), 8) == resident.continue_ids(_ids(6, seed=3), 8)
    assert offloaded.stats()["moved"]["disk->ram"]["pages"] > 0


def test_a_saved_session_keeps_its_page_dtype(tmp_path: Path) -> None:
    model = tiny("qwen3")
    session = _session(model, selector="quest", page_dtype="bfloat16")
    session.feed(_ids(70))
    before = session.continue_ids(_ids(4, seed=7), 6)
    session.save(tmp_path / "s")
    loaded = KVSession.load(tmp_path / "s", twin(model), None, progress=False)
    assert loaded.config.page_dtype == "bfloat16"
    assert loaded.continue_ids(_ids(4, seed=7), 6) == before


def test_a_context_of_bfloat16_pages_reopens_and_answers_as_a_plain_session(
    tmp_path: Path,
) -> None:
    model = tiny("llama")
    context_ids, question = _ids(90, seed=11), _ids(5, seed=12)
    KVContext.encode(
        context_ids, twin(model), None, path=tmp_path / "ctx", progress=False,
        page_dtype="bfloat16", **SMALL,
    ).close()  # fmt: skip
    context = KVContext.open(tmp_path / "ctx", twin(model), None)
    on_context = KVSession(context=context, progress=False)
    plain = _session(model, page_dtype="bfloat16")
    plain.feed(context_ids)
    assert on_context.config.page_dtype == "bfloat16"
    assert on_context.continue_ids(question, 6) == plain.continue_ids(question, 6)
    context.close()


def test_a_squeezed_regroup_reads_bfloat16_pages_back() -> None:
    from memlayer.kvretrieval.squeezed import SqueezedSelector

    dense = tiny("llama")
    ids = _ids(120, seed=8)
    sessions = []
    for page_dtype in ("model", "bfloat16"):
        selector = SqueezedSelector(cluster_fraction=0.2, groups_kept=1000)
        session = KVSession(
            twin(dense), None, progress=False, selector=selector, page_dtype=page_dtype, **SMALL
        )
        session.feed(ids)
        keys, _ = session.cache.memories[0].pages.read()
        assert keys.dtype == torch.float32  # the selector lays out keys in the model's dtype
        session.cache.regroup()
        assert session.cache.memories[0].pages.partial
        sessions.append(session)
    assert sessions[1].continue_ids([], 6) == sessions[0].continue_ids([], 6)


def test_an_unknown_page_dtype_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidInputError, match="page_dtype"):
        _session(tiny("llama"), page_dtype="float8")
