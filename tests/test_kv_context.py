"""KVContext: a fixed context encoded once, reopened anywhere, shared by many KVSessions.

A session on a context must answer exactly as a plain session fed the same context and then
the same conversation; sessions on one context must not see each other; a reopened context
must answer without running the model over the context again.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from kv_models import EXACT, steps_without_host_sync, tiny, twin
from test_kv_resident_step import no_host_reads

from memlayer import (
    ClosedError,
    InvalidInputError,
    KVContext,
    KVSession,
    ModelMismatchError,
    NotFoundError,
)

SMALL = dict(n_init=2, n_local=8, block_size=4, topk=2, chunk_size=8)
SELECTORS = ["infllm", "quest", "rekv"]


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


CONTEXT = _ids(90, seed=1)
QUESTION = _ids(5, seed=2)


def _plain(model: Any, selector: str, *fed: list[int], **config: Any) -> KVSession:
    """A plain session fed `fed` in turn (the reference a session on a context must equal)."""
    session = KVSession(twin(model), None, progress=False, selector=selector, **config)
    for ids in fed:
        session.feed(ids)
    return session


def _encode(model: Any, folder: Path, selector: str = "infllm", **config: Any) -> KVContext:
    config = config or SMALL
    return KVContext.encode(
        CONTEXT, twin(model), None, path=folder, selector=selector, progress=False, **config
    )


def _assert_same_logits(session: KVSession, reference: KVSession, ids: list[int]) -> None:
    """Both give the same logits for `ids` (dtype-tight) and are left as they were."""
    states = session.cache.checkpoint(), reference.cache.checkpoint()
    got = session._forward(ids, all_logits=True)
    expected = reference._forward(ids, all_logits=True)
    session.cache.restore(states[0])
    reference.cache.restore(states[1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _files(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("selector", SELECTORS)
def test_a_session_on_a_context_equals_a_plain_session_fed_the_same(
    selector: str, tmp_path: Path
) -> None:
    model = tiny("llama")
    conversation = _ids(30, seed=3)
    plain = _plain(model, selector, CONTEXT, conversation, **SMALL)
    context = _encode(model, tmp_path / "ctx", selector)
    session = KVSession(context=context, progress=False)
    session.feed(conversation)

    assert session.tokens_fed == plain.tokens_fed
    assert session.stats()["own_pages"] > 0  # the conversation sealed pages of its own
    _assert_same_logits(session, plain, QUESTION)
    assert session.continue_ids(QUESTION, 8) == plain.continue_ids(QUESTION, 8)
    assert session.continue_ids([], 4) == plain.continue_ids([], 4)


@pytest.mark.parametrize("selector", SELECTORS)
def test_exact_positions_with_every_page_selected_equal_dense(
    selector: str, tmp_path: Path
) -> None:
    dense = tiny("qwen3")
    conversation = _ids(40, seed=4)
    with torch.no_grad():
        expected = dense(torch.tensor([CONTEXT + conversation])).logits[0, len(CONTEXT) :]
    context = _encode(dense, tmp_path / "ctx", selector, **EXACT)
    session = KVSession(context=context, progress=False)
    logits = session._forward(conversation, all_logits=True)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert context.stats()["pages"] > 0 and session.stats()["own_pages"] > 0


def test_a_generated_continuation_right_after_the_context_equals_the_plain_one(
    tmp_path: Path,
) -> None:
    """The context keeps the logits of its last token, so `generate()` needs no prompt."""
    model = tiny("llama")
    plain = _plain(model, "infllm", CONTEXT, **SMALL)
    context = _encode(model, tmp_path / "ctx")
    reopened = KVContext.open(tmp_path / "ctx", twin(model), None)
    for ctx in (context, reopened):
        assert KVSession(context=ctx, progress=False).continue_ids([], 6) == plain.continue_ids(
            [], 6
        )


def test_two_sessions_on_one_context_answer_as_on_their_own_copies(tmp_path: Path) -> None:
    model = tiny("llama")
    context = _encode(model, tmp_path / "ctx", "quest")
    sessions = [KVSession(context=context, progress=False) for _ in range(2)]
    copies = [_plain(model, "quest", CONTEXT, **SMALL) for _ in range(2)]
    for turn in range(3):  # interleaved: feed one, ask both, feed the other, ask both
        for who in range(2):
            fed = _ids(20 + 7 * who, seed=10 * turn + who)
            sessions[who].feed(fed)
            copies[who].feed(fed)
            for other in range(2):
                question = _ids(4, seed=100 + turn + other)
                _assert_same_logits(sessions[other], copies[other], question)
                got = sessions[other].continue_ids(question, 6)
                assert got == copies[other].continue_ids(question, 6), (turn, who, other)

    store = context._fixed.store
    first, second = (s.cache.memories[0].pages.prefix.split("/")[0] for s in sessions)
    assert first != second
    context_ids = {i for i in store.ids() if i.startswith("layer")}
    assert len(context_ids) == context.stats()["pages"]
    assert any(i.startswith(first + "/") for i in store.ids())
    sessions[0].close()
    assert not any(i.startswith(first + "/") for i in store.ids())  # its own pages are gone
    assert any(i.startswith(second + "/") for i in store.ids())  # the other's are not
    assert {i for i in store.ids() if i.startswith("layer")} == context_ids
    question = _ids(4, seed=7)
    _assert_same_logits(sessions[1], copies[1], question)
    fresh = KVSession(context=context, progress=False)  # the context itself is intact
    assert fresh.continue_ids(question, 6) == _plain(model, "quest", CONTEXT, **SMALL).continue_ids(
        question, 6
    )
    with pytest.raises(ClosedError):
        sessions[0].feed(question)


def test_sessions_on_a_context_shorter_than_its_sinks_add_sinks_of_their_own(
    tmp_path: Path,
) -> None:
    """A context shorter than n_init: each session adds sinks from its own tokens; each
    session's go to its own copy, so one session's sinks never overwrite another's."""
    model = tiny("llama")
    short = CONTEXT[:1]  # fewer tokens than n_init: the sessions add sinks of their own tokens
    context = KVContext.encode(
        short, twin(model), None, path=tmp_path / "ctx", progress=False, **SMALL
    )
    sessions = [KVSession(context=context, progress=False) for _ in range(2)]
    copies = [_plain(model, "infllm", short, **SMALL) for _ in range(2)]
    for who in range(2):
        fed = _ids(20, seed=3 + who)
        sessions[who].feed(fed)
        copies[who].feed(fed)
        assert sessions[who].cache.memories[0].sinks.count == SMALL["n_init"]
    for session, copy in zip(sessions, copies, strict=True):
        _assert_same_logits(session, copy, QUESTION)
    assert context._fixed.layers[0].sink_count == 0


def test_a_context_reopened_in_a_new_process_answers_without_running_the_model_over_it(
    tmp_path: Path,
) -> None:
    """The other process counts every token its model runs: the question and the answer's
    tokens, none of the context's."""
    model = tiny("llama")
    context = _encode(model, tmp_path / "ctx")
    expected = KVSession(context=context, progress=False).continue_ids(QUESTION, 6)
    script = f"""
import json, sys
sys.path.insert(0, "tests")
from kv_models import tiny
from memlayer import KVContext, KVSession

model = tiny("llama")
ran = []
count = lambda module, args, kwargs: ran.append(kwargs["input_ids"].shape[1])
model.register_forward_pre_hook(count, with_kwargs=True)
context = KVContext.open({str(tmp_path / "ctx")!r}, model, None)
with KVSession(context=context, progress=False) as session:
    answer = session.continue_ids({QUESTION!r}, 6)
    stats = session.stats()
print(json.dumps([answer, sum(ran), stats["prefill_tokens"], context.stats()["pages_touched"]]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer, tokens_run, prefill, touched = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer == expected
    assert tokens_run == len(QUESTION) + 6  # the question, then one forward per new token
    assert prefill == len(QUESTION)
    assert 0 < touched < context.stats()["pages"]  # pages came up on demand, not all


def test_a_context_in_a_database_reopens_and_answers_the_same(tmp_path: Path) -> None:
    model = tiny("llama")
    url = f"sqlite:///{tmp_path / 'contexts.db'}"
    context = KVContext.encode(
        CONTEXT, twin(model), None, path=url, name="manual", progress=False, **SMALL
    )
    expected = _plain(model, "infllm", CONTEXT, **SMALL).continue_ids(QUESTION, 6)
    assert KVSession(context=context, progress=False).continue_ids(QUESTION, 6) == expected
    reopened = KVContext.open(url, twin(model), None, name="manual")
    assert KVSession(context=reopened, progress=False).continue_ids(QUESTION, 6) == expected
    with pytest.raises(NotFoundError):
        KVContext.open(url, twin(model), None, name="other")
    with pytest.raises(InvalidInputError, match="name"):
        KVContext.open(url, twin(model), None)


def test_a_bounded_front_tier_gives_the_same_answers_within_its_budget(tmp_path: Path) -> None:
    model = tiny("llama")
    _encode(model, tmp_path / "ctx", "quest")
    unbounded = KVContext.open(tmp_path / "ctx", twin(model), None)
    bounded = KVContext.open(
        tmp_path / "ctx", twin(model), None, ram_budget="4KiB", offload_path=tmp_path / "off"
    )
    conversation = _ids(30, seed=3)
    answers = []
    for context in (unbounded, bounded):
        session = KVSession(context=context, progress=False)
        session.feed(conversation)
        answers.append(session.continue_ids(QUESTION, 8))
    assert answers[0] == answers[1]
    tiers = bounded.stats()["tiers"]
    assert tiers["ram"]["bytes"] <= 4096
    assert tiers["context"]["pages"] == bounded.stats()["pages"]


def test_a_step_on_a_preloaded_context_reads_nothing_back_to_the_host(tmp_path: Path) -> None:
    model = tiny("llama")
    context = _encode(model, tmp_path / "ctx", "quest")
    context.preload()
    assert context.stats()["tiers"]["ram"]["pages"] == context.stats()["pages"]
    session = KVSession(context=context, progress=False)
    session.feed(_ids(8, seed=3))  # the first chunk is a whole one: its shapes settle
    chunks, token = _ids(24, seed=4), _ids(1, seed=5)
    with no_host_reads():
        session._forward(chunks)  # chunks that seal pages of the session's own
        session._forward(token, phase="decode")
    assert session.stats()["own_pages"] > 0


def test_stats_report_bytes_per_tier_and_how_much_of_the_context_was_read(
    tmp_path: Path,
) -> None:
    model = tiny("llama")
    context = _encode(model, tmp_path / "ctx")
    pages = context.stats()["pages"]
    assert context.stats()["pages_touched"] == 0
    session = KVSession(context=context, progress=False)
    session.continue_ids(QUESTION, 4)
    stats, own = context.stats(), session.stats()
    assert set(stats["bytes"]) == {"ram", "context", "resident"}
    assert stats["bytes"]["context"] > 0 and stats["bytes"]["ram"] > 0
    assert 0 < stats["pages_touched"] < pages
    assert stats["touched_fraction"] == stats["pages_touched"] / pages
    per_layer = pages // 2
    # a step reads topk pages of each layer (some of them the question's own, once sealed)
    assert 0.5 * SMALL["topk"] / per_layer < own["context_read_per_step"]
    assert own["context_read_per_step"] <= SMALL["topk"] / per_layer
    assert stats["sessions"] == 1
    session.close()
    assert context.stats()["sessions"] == 0


def test_a_context_from_another_model_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    _encode(tiny("llama", seed=0), tmp_path / "ctx")
    before = _files(tmp_path / "ctx")
    with pytest.raises(ModelMismatchError):
        KVContext.open(tmp_path / "ctx", tiny("llama", seed=1), None)
    with pytest.raises(ModelMismatchError):
        KVContext.open(tmp_path / "ctx", tiny("qwen3"), None)
    assert _files(tmp_path / "ctx") == before
    context = KVContext.open(tmp_path / "ctx", tiny("llama", seed=0), None)
    with pytest.raises(ModelMismatchError):
        KVSession(tiny("llama", seed=1), None, context=context)
    assert context.stats()["sessions"] == 0


def test_missing_or_damaged_folders_give_clear_errors(tmp_path: Path) -> None:
    model = tiny("llama")
    with pytest.raises(NotFoundError, match="KV context"):
        KVContext.open(tmp_path / "missing", model, None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="path: must be a folder"):
        KVContext.open(tmp_path / "file", model, None)
    saved = KVSession(twin(model), None, progress=False, **SMALL)
    saved.feed(CONTEXT)
    saved.save(tmp_path / "session")
    with pytest.raises(InvalidInputError, match="saved KVSession"):
        KVContext.open(tmp_path / "session", model, None)

    _encode(model, tmp_path / "ctx")
    damaged = tmp_path / "damaged"
    for name, damage in [
        ("context.json", lambda folder: (folder / "context.json").write_text("{not json")),
        ("format", lambda folder: (folder / "context.json").write_text('{"format": "x"}')),
        ("state.pt", lambda folder: (folder / "state.pt").unlink()),
        ("state.pt", lambda folder: (folder / "state.pt").write_bytes(b"garbage")),
        ("missing", lambda folder: _drop_a_page(folder)),
    ]:
        subprocess.run(["rm", "-rf", str(damaged)], check=True)
        subprocess.run(["cp", "-r", str(tmp_path / "ctx"), str(damaged)], check=True)
        damage(damaged)
        with pytest.raises(InvalidInputError) as info:
            KVContext.open(damaged, twin(model), None)
        assert info.value.field == "path", name

    with pytest.raises(InvalidInputError, match="path: must be a new or empty folder"):
        _encode(model, tmp_path / "ctx")
    with pytest.raises(InvalidInputError, match="text"):
        KVContext.encode([], twin(model), None, path=tmp_path / "empty", progress=False)
    assert not (tmp_path / "empty").exists()  # a refused encoding wrote nothing


def _drop_a_page(folder: Path) -> None:
    """Rewrite the pages without one (as a partial copy of the folder would leave it)."""
    from memlayer.stores import DiskTier

    tier = DiskTier(folder / "pages")
    tier.evict(sorted(tier.ids())[0])
    tier.close()


@pytest.mark.parametrize(
    ("option", "field"),
    [
        ({"block_size": 8}, "block_size"),
        ({"n_local": 16}, "n_local"),
        ({"positions": "exact"}, "positions"),
        ({"topk": 3}, "topk"),
        ({"selector": "quest"}, "selector"),
        ({"chat": True}, "chat"),
        ({"ram_budget": "1MiB"}, "ram_budget"),
        ({"window": 3}, "window"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_settings_that_conflict_with_the_context_name_the_field(
    option: dict[str, Any], field: str, tmp_path: Path
) -> None:
    context = KVContext.encode(
        CONTEXT, tiny("llama"), None, path=tmp_path / "ctx", chat=False, progress=False, **SMALL
    )
    with pytest.raises(InvalidInputError) as info:
        KVSession(context=context, progress=False, **option)
    assert info.value.field == field
    assert context.stats()["sessions"] == 0
    same = KVSession(context=context, progress=False, selector="infllm", chat=False, **SMALL)
    assert same.config == context.config


def test_closing_the_context_closes_its_sessions(tmp_path: Path) -> None:
    with _encode(tiny("llama"), tmp_path / "ctx") as context:
        session = KVSession(context=context, progress=False)
        session.feed(_ids(10, seed=3))
    with pytest.raises(ClosedError):
        session.continue_ids(QUESTION, 2)
    with pytest.raises(ClosedError):
        KVSession(context=context)
    with pytest.raises(ClosedError):
        context.stats()


@pytest.mark.gpu
def test_on_cuda_a_preloaded_context_answers_as_a_plain_session_and_never_synchronizes(
    tmp_path: Path,
) -> None:
    """The context's front tier is the GPU: a session's answers equal a plain session's, and
    once every page is up, a layer's steps (chunks that seal pages, one-token steps) run with
    CUDA's sync checker set to fail on any synchronisation."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny("llama").cuda()
    context = _encode(model, tmp_path / "ctx", "quest")
    assert "gpu" in context.stats()["tiers"]
    plain = _plain(model, "quest", CONTEXT, **SMALL)
    session = KVSession(context=context, progress=False)
    assert session.continue_ids(QUESTION, 8) == plain.continue_ids(QUESTION, 8)

    context.preload()
    memory = session.cache.memories[0]
    outputs = steps_without_host_sync(memory, [8] * 3 + [1] * 12)
    assert memory.pages.count > memory.pages.first  # the session sealed pages of its own
    assert all(bool(out.isfinite().all()) for out in outputs)


def test_a_squeezed_context_is_clustered_once_and_reopens_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`squeezed` on a fixed context: encode regroups the pages by key cluster (partly filled
    pages), `open` brings the clusters back without k-means, and with every cluster kept a
    session on the reopened context equals the dense model."""
    import faiss

    from memlayer.kvretrieval.squeezed import SqueezedSelector

    calls: list[int] = []
    real = faiss.Kmeans

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(faiss, "Kmeans", counted)
    dense = tiny("llama")
    conversation = _ids(30, seed=4)
    with torch.no_grad():
        expected = dense(torch.tensor([CONTEXT + conversation])).logits[0, len(CONTEXT) :]
    keep_all = SqueezedSelector(cluster_fraction=0.2, groups_kept=1000)
    KVContext.encode(
        CONTEXT,
        twin(dense),
        None,
        path=tmp_path / "ctx",
        selector=keep_all,
        progress=False,
        **EXACT,
    ).close()
    clustered = len(calls)
    assert clustered > 0
    context = KVContext.open(tmp_path / "ctx", twin(dense), None, selector=keep_all)
    assert len(calls) == clustered  # reopened: nothing clustered again
    session = KVSession(context=context, progress=False)
    assert session.cache.memories[0].pages.partial  # cluster pages, partly filled
    logits = session._forward(conversation, all_logits=True)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


# -- calibration at encode time ----------------------------------------------------------------


def _squeezed() -> Any:
    from memlayer.kvretrieval.squeezed import SqueezedSelector

    return SqueezedSelector(clusters=6, mass=0.5)


CALIBRATION = [_ids(9, seed=21), _ids(7, seed=22)]
KEEP_ALL = dict(SMALL, topk=1000)  # no page budget: what is kept is the threshold's choice


def _thresholds(session: KVSession) -> list[torch.Tensor | None]:
    return [memory.selector.thresholds for memory in session.cache.memories]


def test_calibration_questions_set_squeezed_thresholds_that_persist_and_prune_pages(
    tmp_path: Path,
) -> None:
    """`KVContext.encode(calibration=...)` calibrates as a plain session's
    `cache.calibrating()` would, the thresholds come back with `open`, and they change what
    a question reads (uncalibrated, squeezed keeps every page the budget allows)."""
    from memlayer.kv_context import CALIBRATION_NEW_TOKENS

    model = tiny("llama")
    reference = _plain(model, _squeezed(), CONTEXT, **KEEP_ALL)
    reference.cache.regroup()
    with reference.cache.calibrating():
        for ids in CALIBRATION:
            reference.continue_ids(ids, CALIBRATION_NEW_TOKENS)
    expected = _thresholds(reference)

    for folder, calibration in (("plain", None), ("calibrated", CALIBRATION)):
        KVContext.encode(
            CONTEXT,
            twin(model),
            None,
            path=tmp_path / folder,
            selector=_squeezed(),
            calibration=calibration,
            progress=False,
            **KEEP_ALL,
        ).close()
    read = {}
    for folder in ("plain", "calibrated"):
        with (
            KVContext.open(tmp_path / folder, twin(model), None) as context,
            KVSession(context=context, progress=False) as session,
        ):
            thresholds = _thresholds(session)
            if folder == "plain":
                assert thresholds == [None, None]
            else:
                for got, want in zip(thresholds, expected, strict=True):
                    assert got is not None and want is not None
                    torch.testing.assert_close(got, want)
            session.continue_ids(QUESTION, 4)
            read[folder] = session.stats()["pages_selected"]
    assert 0 < read["calibrated"] < read["plain"]


def test_bad_calibration_is_refused_naming_the_field_and_writes_nothing(tmp_path: Path) -> None:
    model = tiny("llama")
    folder = tmp_path / "ctx"
    cases: list[tuple[Any, Any, str]] = [
        ("a question", _squeezed(), "must be a list of sample questions"),
        (5, _squeezed(), "must be a list of sample questions"),
        ([], _squeezed(), "must hold at least one question"),
        ([_ids(4, seed=1), "  "], _squeezed(), "question 1 must be a non-empty string"),
        ([[]], _squeezed(), "question 0 must be a non-empty string"),
        ([[3, -1]], _squeezed(), "question 0 must be a non-empty string or list of token ids"),
        ([[3, True]], _squeezed(), "question 0 must be"),
        ([[3, 96]], _squeezed(), "question 0 holds ids outside the vocabulary"),
        (["What is it?"], _squeezed(), "question 0 is text: it needs a tokenizer"),
        (CALIBRATION, "infllm", "the selector 'infllm' does not calibrate"),
    ]
    for calibration, selector, message in cases:
        with pytest.raises(InvalidInputError, match=f"calibration: {message}"):
            KVContext.encode(
                CONTEXT,
                twin(model),
                None,
                path=folder,
                selector=selector,
                calibration=calibration,
                progress=False,
                **SMALL,
            )
        assert not folder.exists() or not any(folder.iterdir())
