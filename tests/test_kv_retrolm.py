"""RetroLM (`selector="retrolm"`): one page selection per question, shared by every layer.

Checked on tiny random models: with every page selected it reproduces dense attention; the
pinned pages are the retriever's choice and every layer attends to them at every step of an
answer; the retrieval pass and the answer leave the memory exactly as it was; the trained
retriever's file round-trips and is refused for another geometry or, by the fingerprint it
keeps, for another model of the same geometry; training on planted-fact
pairs beats its random start on held-out contexts; bad input is refused and changes nothing.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from kv_models import EXACT, tiny, twin
from test_kv_resident_step import no_host_reads

from memlayer import InvalidInputError, KVSession, ModelMismatchError
from memlayer.kvretrieval.model import fingerprint
from memlayer.kvretrieval.page_retriever import PageRetriever, recall_at, train
from memlayer.kvretrieval.planted import token_context
from memlayer.kvretrieval.question_pages import page_summaries, question_pages, question_queries
from memlayer.kvretrieval.retrolm import RetroLMSelector, training_free_scores
from memlayer.retrolm_training import collect, retrieval_examples, train_retriever_file

SMALL = dict(n_init=2, n_local=8, block_size=4, topk=2, chunk_size=8)
TINY_GEOMETRY = (2, 2, 16)  # tiny(): layers, KV heads, head dim


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _random_file(path: Path, geometry: tuple[int, int, int] = TINY_GEOMETRY) -> Path:
    return PageRetriever.create(*geometry, rank=4, init="random", seed=1).save(path)


def _memory_state(session: KVSession) -> list[dict[str, Any]]:
    """Everything a layer keeps: window, sinks, pages (summaries, starts, payloads)."""
    out = []
    for memory in session.cache.memories:
        pages = memory.pages
        payloads = pages.store.get([pages.page_id(i) for i in range(pages.count)])
        out.append(
            {
                "window_k": memory.window.raw_keys().clone(),
                "window_v": memory.window.values().clone(),
                "window_start": memory.window.start,
                "sink_k": memory.sinks.keys().clone(),
                "sink_v": memory.sinks.values().clone(),
                "summaries": pages.summaries[: pages.count].clone(),
                "starts": list(pages.starts),
                "k": [page.payload["k"].clone() for page in payloads],  # type: ignore[index]
                "pin": memory.pin,
                "recorded": memory.recorded,
            }
        )
    return out


def _assert_same_state(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    for layer_before, layer_after in zip(before, after, strict=True):
        for key, value in layer_before.items():
            other = layer_after[key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), key
            elif key == "k":
                assert len(value) == len(other) and all(
                    torch.equal(a, b) for a, b in zip(value, other, strict=True)
                )
            else:
                assert value == other, key


# -- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("retriever", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen3", "llama-yarn"])
def test_every_page_selected_equals_dense(family: str, retriever: bool, tmp_path: Path) -> None:
    dense = tiny(family)
    context, question = _ids(90, seed=3), _ids(21, seed=4)  # the question seals pages too
    with torch.no_grad():
        full = torch.tensor([context + question])
        expected = dense(full).logits[0, len(context) :]
        continuation = dense.generate(full, max_new_tokens=8, do_sample=False)[0, 111:].tolist()

    path = _random_file(tmp_path / "r.safetensors") if retriever else None
    selector = RetroLMSelector(retriever=None if path is None else str(path))
    session = KVSession(twin(dense), None, progress=False, selector=selector, **EXACT)
    session.feed(context)
    pages = session.cache.memories[0].pages.count
    assert pages > 0
    state = session.cache.checkpoint()
    with question_pages(session.cache, selector, lambda: session._forward(question)):
        assert session.cache.memories[0].pin is not None  # pinned: every page, chosen once
        logits = session._forward(question, all_logits=True)
        assert session.cache.memories[0].pages.count > pages  # pages sealed after the pin
    session.cache.restore(state)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert session.continue_ids(question, 8) == continuation


# -- one selection, every layer; the memory left as it was ------------------------------------


def test_one_selection_serves_every_layer_and_leaves_the_memory_as_it_was() -> None:
    model = tiny("llama")
    session = KVSession(model, None, progress=False, selector="retrolm", **SMALL)
    session.feed(_ids(120, seed=5))
    question = _ids(12, seed=6)
    before = _memory_state(session)

    # the retrieval pass alone leaves nothing behind
    queries = question_queries(session.cache, lambda: session._forward(question))
    assert [q.shape for q in queries] == [torch.Size([1, 4, 12, 16])] * 2
    _assert_same_state(before, _memory_state(session))
    expected = session.selector.choose(queries, page_summaries(session.cache), 2)

    chosen: list[list[torch.Tensor]] = [[] for _ in session.cache.memories]
    for memory, steps in zip(session.cache.memories, chosen, strict=True):
        select = memory.select

        def recording(
            q: torch.Tensor, scale: float | None = None, select: Any = select, steps: Any = steps
        ) -> torch.Tensor:
            steps.append(select(q, scale))
            return steps[-1]

        memory.select = recording  # type: ignore[method-assign]
    session.continue_ids(question, 6)

    first, second = chosen
    assert len(first) == 8  # the question (two chunks of chunk_size 8), then 6 decode steps
    for step_first, step_second in zip(first, second, strict=True):
        assert torch.equal(step_first, step_second)  # every layer attends to the same pages
        assert torch.equal(step_first[0, :, :2], expected.expand(2, 2))  # the pinned ones
        assert (step_first[0, 0] == step_first[0, 1]).all()  # and every KV head
    # pages the answer sealed itself join after the pin (the newest topk of them)
    assert max(step.shape[-1] for step in first) > 2
    for memory in session.cache.memories:
        del memory.select  # back to the class's method
    _assert_same_state(before, _memory_state(session))


def test_pinned_steps_read_nothing_back_to_the_host() -> None:
    session = KVSession(tiny("llama"), None, progress=False, selector="retrolm", **SMALL)
    session.feed(_ids(60, seed=7))
    question, tokens = _ids(20, seed=8), _ids(6, seed=9)
    pages = session.stats()["pages"]
    # the retrieval pass, the ranking, the pin, the question's chunks and decode steps
    with (
        no_host_reads(),
        question_pages(session.cache, session.selector, lambda: session._forward(question)),
    ):
        session._forward(question)
        for token in tokens:
            session._forward([token])
    assert session.stats()["pages"] > pages  # pages were sealed (and attended) after the pin


def test_ask_without_pages_and_generate_without_a_prompt_still_answer() -> None:
    session = KVSession(tiny("llama"), None, progress=False, selector="retrolm", **SMALL)
    session.feed(_ids(6, seed=10))  # no page sealed yet: the pin is empty
    assert len(session.continue_ids(_ids(30, seed=11), 4)) == 4
    session.feed(_ids(60, seed=12))
    assert len(session.continue_ids([], 4)) == 4  # no question: per-step selection


# -- the trained retriever's file --------------------------------------------------------------


def test_retriever_file_round_trips_and_serves_a_session(tmp_path: Path) -> None:
    retriever = PageRetriever.create(*TINY_GEOMETRY, rank=4, init="random", seed=2)
    path = retriever.save(tmp_path / "retriever.safetensors")
    loaded = PageRetriever.load(path)
    for mine, theirs in zip(retriever.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    questions, pages = torch.randn(2, 2, 16), torch.randn(2, 9, 2, 16)
    assert torch.equal(loaded.scores(questions, pages), retriever.scores(questions, pages))

    model = tiny("llama")
    selector = RetroLMSelector(retriever=str(path))
    session = KVSession(model, None, progress=False, selector=selector, **SMALL)
    session.feed(_ids(80, seed=13))
    question = _ids(10, seed=14)
    queries = question_queries(session.cache, lambda: session._forward(question))
    summaries = page_summaries(session.cache)
    ranked = selector.rank(queries, summaries)
    free = RetroLMSelector().rank(queries, summaries)
    assert not torch.allclose(ranked, free)  # the file's scorer ranks, not the default
    answer = session.continue_ids(question, 4)

    session.save(tmp_path / "saved")  # the file's path is a saved option
    again = KVSession.load(tmp_path / "saved", model, None, progress=False)
    assert again.selector == selector and again.selector.scorer is not None
    assert again.continue_ids(question, 4) == answer


def test_a_file_for_another_geometry_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    path = _random_file(tmp_path / "three-layers.safetensors", geometry=(3, 2, 16))
    model = tiny("llama")
    ids = torch.tensor([_ids(20, seed=15)])
    with torch.no_grad():
        expected = model(ids).logits
    implementation = model.config._attn_implementation
    with pytest.raises(InvalidInputError, match="retriever: was trained for a model with 3 layers"):
        KVSession(model, None, progress=False, selector=RetroLMSelector(retriever=str(path)))
    assert model.config._attn_implementation == implementation
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_a_file_trained_on_another_model_of_the_same_shape_is_refused(tmp_path: Path) -> None:
    trained_on, other = tiny("llama"), tiny("llama", seed=1)  # same geometry, other weights
    mine, theirs = fingerprint(trained_on), fingerprint(other)
    assert mine != theirs
    retriever = PageRetriever.create(*TINY_GEOMETRY, rank=4, seed=3, fingerprint=mine)
    path = retriever.save(tmp_path / "r.safetensors")
    assert PageRetriever.load(path).fingerprint == mine
    ids = torch.tensor([_ids(20, seed=16)])
    with torch.no_grad():
        expected = other(ids).logits
    implementation = other.config._attn_implementation
    selector = RetroLMSelector(retriever=str(path))
    with pytest.raises(ModelMismatchError, match=f"fingerprint {mine}.*fingerprint is {theirs}"):
        KVSession(other, None, progress=False, selector=selector, **SMALL)
    assert other.config._attn_implementation == implementation
    with torch.no_grad():
        assert torch.equal(other(ids).logits, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model it was trained on: no warning either
        KVSession(trained_on, None, progress=False, selector=selector, **SMALL).close()


def test_a_file_saved_without_a_fingerprint_loads_with_a_warning(tmp_path: Path) -> None:
    """Files saved before the fingerprint was kept: the geometry is still checked, and the
    warning says the model could not be."""
    path = _random_file(tmp_path / "old.safetensors")
    assert PageRetriever.load(path).fingerprint is None
    with pytest.warns(UserWarning, match="keeps no model fingerprint"):
        session = KVSession(
            tiny("llama", seed=1), None, progress=False, selector=RetroLMSelector(str(path))
        )
    assert session.selector.scorer is not None


# -- the `heads` kind: weights per layer and KV head over the training-free z-scores ----------


def test_a_heads_scorer_starts_as_the_training_free_ranking_and_round_trips(
    tmp_path: Path,
) -> None:
    questions, pages = torch.randn(2, 2, 16), torch.randn(2, 9, 2, 16)
    start = PageRetriever.create(*TINY_GEOMETRY, rank=0, kind="heads")
    assert start.width == 2 * 2 and start.query.shape == (0, 4)
    torch.testing.assert_close(
        start.scores(questions, pages), training_free_scores(questions, pages)
    )

    trained = PageRetriever.create(*TINY_GEOMETRY, rank=0, kind="heads", init="random", seed=4)
    loaded = PageRetriever.load(trained.save(tmp_path / "heads.safetensors"))
    assert loaded.kind == "heads" and loaded.rank == 0
    assert torch.equal(loaded.scores(questions, pages), trained.scores(questions, pages))


def test_training_a_heads_scorer_lowers_its_loss_and_serves_a_session(tmp_path: Path) -> None:
    """The z-scores depend on the question: each example keeps its own page features."""
    model = tiny("llama")
    path, losses = train_retriever_file(
        tmp_path / "heads.safetensors",
        model,
        None,
        contexts=4,
        tokens=240,
        facts=10,
        steps=60,
        rank=0,
        kind="heads",
        **TRAIN_CONFIG,
    )
    assert sum(losses[-10:]) < sum(losses[:10])
    selector = RetroLMSelector(retriever=str(path))
    assert selector.scorer is not None and selector.scorer.kind == "heads"
    session = KVSession(model, None, progress=False, selector=selector, **TRAIN_CONFIG)
    session.feed(_ids(200, seed=17))
    assert len(session.continue_ids(_ids(6, seed=18), 3)) == 3


# -- training ----------------------------------------------------------------------------------

TRAIN_CONFIG = dict(n_init=4, n_local=16, block_size=8, topk=2, chunk_size=32)


def test_training_beats_its_random_start_on_held_out_contexts() -> None:
    model = tiny("llama")
    contexts = [token_context(96, 240, 10, seed) for seed in range(20)]
    examples = collect(model, None, contexts[:14], **TRAIN_CONFIG)
    held_out = collect(model, None, contexts[14:], **TRAIN_CONFIG)  # contexts never trained on
    assert len(examples) >= 100 and len(held_out) >= 40
    chance = 2 / held_out[0].pages.shape[1]  # recall@k of a random ranking: k / pages

    retriever = PageRetriever.create(*TINY_GEOMETRY, rank=16, init="random", seed=0)

    def recall() -> float:
        scores = [retriever.scores(e.question, e.pages) for e in held_out]
        return recall_at(scores, [e.answer for e in held_out], 2)

    before = recall()
    losses = train(retriever, examples, steps=150, seed=0)
    after = recall()
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert after >= before + 0.15
    assert after >= 3 * chance


def test_train_retriever_file_writes_a_file_a_session_loads(tmp_path: Path) -> None:
    model = tiny("llama")
    path, losses = train_retriever_file(
        tmp_path / "r.safetensors",
        model,
        None,
        contexts=2,
        tokens=160,
        facts=4,
        steps=5,
        **TRAIN_CONFIG,
    )
    assert len(losses) == 5 and path.is_file()
    assert PageRetriever.load(path).fingerprint == fingerprint(model)
    session = KVSession(model, None, progress=False, selector=RetroLMSelector(retriever=str(path)))
    assert session.selector.scorer is not None


# -- bad input ---------------------------------------------------------------------------------


def test_bad_options_are_refused_with_the_field_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="retriever: is not a file"):
        RetroLMSelector(retriever=str(tmp_path / "missing.safetensors"))
    with pytest.raises(InvalidInputError, match="retriever: must be a file path or None"):
        RetroLMSelector(retriever=3)  # type: ignore[arg-type]
    (tmp_path / "text.safetensors").write_text("not tensors")
    with pytest.raises(InvalidInputError, match="retriever: is not a safetensors file"):
        RetroLMSelector(retriever=str(tmp_path / "text.safetensors"))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InvalidInputError, match="retriever: is not a memlayer-retrolm"):
        RetroLMSelector(retriever=str(tmp_path / "other.safetensors"))
    for band in [(0.5, 0.2), (0.0, 1.5), (0.1,), "all"]:
        with pytest.raises(InvalidInputError, match="layers: must be two fractions"):
            RetroLMSelector(layers=band)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="topk: "):
        KVSession(tiny("llama"), None, progress=False, selector="retrolm", topk=0)
    with pytest.raises(InvalidInputError, match="rank: must be an integer of at least 0"):
        PageRetriever.create(*TINY_GEOMETRY, rank=-1)
    with pytest.raises(InvalidInputError, match="kind: must be one of"):
        PageRetriever.create(*TINY_GEOMETRY, kind="layers")
    with pytest.raises(InvalidInputError, match="examples: must not be empty"):
        train(PageRetriever.create(*TINY_GEOMETRY), [])
    with pytest.raises(InvalidInputError, match="contexts: must be a positive integer"):
        train_retriever_file(tmp_path / "r.safetensors", tiny("llama"), None, contexts=0)
    assert not (tmp_path / "r.safetensors").exists()


def test_a_session_that_was_fed_is_refused_for_examples() -> None:
    session = KVSession(tiny("llama"), None, progress=False, selector="retrolm", **SMALL)
    session.feed(_ids(30, seed=16))
    context = token_context(96, 100, 2, seed=0)
    with pytest.raises(InvalidInputError, match="session: must be fresh"):
        retrieval_examples(session, context)
