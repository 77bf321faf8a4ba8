"""KVSession behaviour: selection, questions leave memory intact, save/load, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from kv_models import tiny, twin

import memlayer.kv_session as kv_session_module
from memlayer import (
    InvalidInputError,
    KVSession,
    ModelMismatchError,
    NotFoundError,
    UnsupportedModelError,
)
from memlayer.kvretrieval.selectors import InfLLMSelector
from memlayer.types import Page

SMALL = dict(n_init=2, n_local=8, block_size=4, topk=2, chunk_size=8)


def _ids(n: int, seed: int = 5) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("selector", ["infllm", "quest"])
def test_a_planted_page_aligned_with_the_query_is_selected(selector: str) -> None:
    session = KVSession(tiny("llama"), None, progress=False, selector=selector, **SMALL)
    session.feed(_ids(80))
    memory = session.cache.memories[0]
    count = memory.pages.count
    assert count >= 8
    query = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(9))
    placed = memory.memory_queries(query)
    target = 5
    group_mean = placed[0].reshape(2, 2, 16).mean(dim=1)  # per KV head
    keys = group_mean.unsqueeze(1).expand(2, 4, 16) * 20
    memory.pages.store.put(Page(id=memory.pages.page_id(target), payload={"k": keys, "v": keys}))
    memory.pages.summaries[target] = memory.selector.summarize(keys[None], placed[0])[0]
    chosen = memory.select(placed)
    assert (chosen == target).any(dim=-1).all()


def test_questions_leave_the_fed_context_intact() -> None:
    session = KVSession(tiny("llama"), None, progress=False, **SMALL)
    session.feed(_ids(60))
    fed, pages = session.tokens_fed, session.stats()["pages"]
    first = session.continue_ids(_ids(5, seed=6), 6)
    second = session.continue_ids(_ids(5, seed=6), 6)
    assert first == second
    assert session.tokens_fed == fed and session.stats()["pages"] == pages


def test_stats_count_prefill_and_decode_forwards_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fed and prompt tokens are prefill, generated tokens' forwards decode, nothing twice.

    A fake clock advances one second per token each time the model runs, so a phase's
    seconds equal the tokens its forwards carried exactly when the two timers split the
    forwards between them.
    """
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(kv_session_module, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    model = tiny("llama")

    def advance(module: Any, args: tuple, kwargs: dict) -> None:
        clock.now += kwargs["input_ids"].shape[1]

    model.register_forward_pre_hook(advance, with_kwargs=True)
    session = KVSession(model, None, progress=False, **SMALL)
    session.feed(_ids(20))  # three chunks
    assert len(session.continue_ids(_ids(5, seed=6), 6)) == 6  # a prompt, then 6 tokens
    assert len(session.continue_ids([], 4)) == 4  # from the fed memory's last logits
    stats = session.stats()
    assert (stats["prefill_tokens"], stats["decode_tokens"]) == (20 + 5, 6 + 4)
    assert (stats["prefill_s"], stats["decode_s"]) == (25.0, 10.0)
    assert stats["prefill_s"] + stats["decode_s"] == clock.now


def test_save_then_load_answers_the_same(tmp_path: Path) -> None:
    model = tiny("qwen3")
    session = KVSession(twin(model), None, progress=False, selector="quest", **SMALL)
    session.feed(_ids(70))
    before = session.continue_ids(_ids(4, seed=7), 6)
    session.save(tmp_path / "s")
    loaded = KVSession.load(tmp_path / "s", twin(model), None, progress=False)
    assert loaded.config == session.config
    assert loaded.tokens_fed == session.tokens_fed
    assert loaded.continue_ids(_ids(4, seed=7), 6) == before


def test_loading_with_another_model_is_refused(tmp_path: Path) -> None:
    session = KVSession(tiny("llama", seed=0), None, progress=False, **SMALL)
    session.feed(_ids(20))
    session.save(tmp_path / "s")
    with pytest.raises(ModelMismatchError):
        KVSession.load(tmp_path / "s", tiny("llama", seed=1), None)
    with pytest.raises(NotFoundError):
        KVSession.load(tmp_path / "missing", tiny("llama"), None)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"block_size": 0}, "block_size"),
        ({"n_local": -1}, "n_local"),
        ({"topk": 0}, "topk"),
        ({"selector": "magic"}, "selector"),
        ({"positions": "absolute"}, "positions"),
        ({"window": 3}, "window"),
    ],
)
def test_bad_configuration_names_the_field(config: dict, field: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        KVSession(tiny("llama"), None, progress=False, **config)
    assert info.value.field == field


def test_bad_calls() -> None:
    session = KVSession(tiny("llama"), None, progress=False, **SMALL)
    with pytest.raises(InvalidInputError, match="question"):
        session.ask("anything?")
    with pytest.raises(InvalidInputError, match="text"):
        session.feed([])
    with pytest.raises(InvalidInputError, match="text"):
        session.feed("   ")


def test_models_without_attention_interface_are_refused() -> None:
    class Plain(torch.nn.Module):
        config = None

    with pytest.raises(UnsupportedModelError):
        KVSession(Plain(), None, progress=False)


@pytest.mark.parametrize("selector", ["infllm", "quest"])
def test_offloaded_pages_give_identical_outputs(selector: str, tmp_path: Path) -> None:
    """A RAM budget of a few pages pushes most of them to disk; answers do not change."""
    model = tiny("llama")
    resident = KVSession(twin(model), None, progress=False, selector=selector, **SMALL)
    offloaded = KVSession(
        twin(model),
        None,
        progress=False,
        selector=selector,
        ram_budget="4KiB",
        offload_path=tmp_path / "offload",
        **SMALL,
    )
    for session in (resident, offloaded):
        session.feed(_ids(120))
    assert offloaded.continue_ids(_ids(6, seed=3), 8) == resident.continue_ids(_ids(6, seed=3), 8)
    tiers = offloaded.stats()["tiers"]
    assert tiers["ram"]["bytes"] <= 4096
    assert tiers["disk"]["pages"] == offloaded.stats()["pages"] > tiers["ram"]["pages"]
    assert offloaded.stats()["moved"]["disk->ram"]["pages"] > 0
    assert resident.stats()["selection_hit_rate"] == 1.0
    assert 0.0 < offloaded.stats()["selection_hit_rate"] < 1.0
    assert any((tmp_path / "offload").glob("segment-*.log"))


def test_budgets_too_small_for_a_step_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="ram_budget: must hold the 2 pages"):
        KVSession(tiny("llama"), None, progress=False, ram_budget=1500, page_dtype="model", **SMALL)
    with pytest.raises(InvalidInputError, match="ram_budget"):
        KVSession(tiny("llama"), None, progress=False, ram_budget="100B", **SMALL)
    with pytest.raises(InvalidInputError, match="gpu_budget: needs a model on a CUDA device"):
        KVSession(tiny("llama"), None, progress=False, gpu_budget="1GiB", **SMALL)


def test_a_session_saved_by_0_2_0_loads_and_answers_as_it_did(tmp_path: Path) -> None:
    """tests/fixtures/kvsession-0.2.0 was saved by memlayer 0.2.0 (commit 3e66985): tiny
    llama, SMALL with repr_topk=3, fed 60 ids of seed 11; expected.json holds the question
    (5 ids of seed 14) and the 8 tokens 0.2.0 answered. Its layer tensors carry 0.2.0's
    names (buffer_*, init_*) and its config InfLLM's repr_topk."""
    folder = tmp_path / "saved"  # a copy: opening a page folder may tidy it
    shutil.copytree(Path(__file__).parent / "fixtures" / "kvsession-0.2.0", folder)
    expected = json.loads((folder / "expected.json").read_text())
    loaded = KVSession.load(folder, tiny("llama"), None, progress=False)
    assert loaded.selector == InfLLMSelector(repr_topk=3)
    assert loaded.tokens_fed == 60 and loaded.stats()["pages"] > 0
    assert loaded.continue_ids(expected["question"], 8) == expected["answer"]


def test_prefetch_for_the_next_layer_raises_the_hit_rate_and_changes_no_answer(
    tmp_path: Path,
) -> None:
    """With a bounded RAM tier, each layer's picks go up for the next layer ahead of use."""
    model = tiny("llama")
    answers, hit_rates = [], []
    for prefetch in (False, True):
        session = KVSession(
            twin(model),
            None,
            progress=False,
            selector="quest",
            ram_budget="2KiB",  # one layer's picks: the next layer's were pushed out
            offload_path=tmp_path / f"offload-{prefetch}",
            prefetch=prefetch,
            **SMALL,
        )
        session.feed(_ids(160))
        answers.append(session.continue_ids(_ids(6, seed=3), 8))
        hit_rates.append(session.stats()["selection_hit_rate"])
    assert answers[0] == answers[1]
    assert hit_rates[1] > hit_rates[0], hit_rates


def test_a_dropped_session_frees_its_memory_without_waiting_for_the_garbage_collector() -> None:
    """No reference cycle holds a session's cache (its pages, its window buffers) alive."""
    import gc
    import weakref

    session = KVSession(tiny("llama"), None, progress=False, **SMALL)
    session.feed(_ids(60))
    cache = weakref.ref(session.cache)
    gc.disable()
    try:
        del session
        assert cache() is None
    finally:
        gc.enable()


def _saved_pages(url: str) -> list[str]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        ids = [row[0] for row in conn.execute(text("SELECT id FROM memlayer_kv_pages"))]
    engine.dispose()
    return ids


def test_a_session_saved_to_a_database_answers_the_same_and_a_resave_replaces_it(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    model = tiny("llama")
    session = KVSession(twin(model), None, progress=False, **SMALL)
    session.feed(_ids(70))
    before = session.continue_ids(_ids(4, seed=7), 6)
    session.save(url, name="call-17")
    first_save = set(_saved_pages(url))
    loaded = KVSession.load(url, twin(model), None, name="call-17", progress=False)
    assert loaded.tokens_fed == session.tokens_fed
    assert loaded.continue_ids(_ids(4, seed=7), 6) == before

    session.feed(_ids(30, seed=8))
    after = session.continue_ids(_ids(4, seed=7), 6)
    session.save(url, name="call-17")
    second_save = set(_saved_pages(url))
    assert first_save.isdisjoint(second_save)  # the older generation is gone
    assert len(second_save) > len(first_save)
    reloaded = KVSession.load(url, twin(model), None, name="call-17", progress=False)
    assert reloaded.tokens_fed == session.tokens_fed
    assert reloaded.continue_ids(_ids(4, seed=7), 6) == after
    with pytest.raises(NotFoundError):
        KVSession.load(url, twin(model), None, name="call-18")
    with pytest.raises(InvalidInputError, match="name"):
        session.save(url)
    with pytest.raises(InvalidInputError, match="name"):
        session.save(url, name="../etc")
    assert set(_saved_pages(url)) == second_save  # refused saves stored nothing


@pytest.mark.postgres
def test_a_session_saved_to_postgresql_by_one_process_is_loaded_by_another(
    postgres_url: str, tmp_path: Path
) -> None:
    """Another process (standing in for another host) loads the session from the database
    and answers exactly as the saving session would."""
    import subprocess
    import sys

    session = KVSession(tiny("qwen3"), None, progress=False, selector="quest", **SMALL)
    session.feed(_ids(70))
    expected = session.continue_ids(_ids(4, seed=7), 6)
    session.save(postgres_url, name="shared-session")
    script = (
        "import json, sys, torch; sys.path.insert(0, 'tests'); from kv_models import tiny;"
        "from memlayer import KVSession;"
        "ids = torch.randint(0, 96, (4,), generator=torch.Generator().manual_seed(7)).tolist();"
        f"s = KVSession.load({postgres_url!r}, tiny('qwen3'), None, name='shared-session',"
        " progress=False);"
        "print(json.dumps(s.continue_ids(ids, 6)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
