"""Squeezed Attention (`squeezed`): a fixed context clustered once, pages gathered by cluster.

The session tests feed a tiny random model, call `cache.regroup()` (what a fixed-context
builder does once), and go on: with every cluster kept the logits equal dense attention;
the regrouped pages hold exactly the fed tokens; save and load keep the clusters without
running k-means again; a regrouped step reads nothing back to the host. The selector tests
lay out synthetic clustered keys directly: hierarchical scoring with every group opened
keeps the clusters flat scoring keeps, and calibration keeps its target mass.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from kv_models import EXACT, tiny, twin
from test_kv_resident_step import no_host_reads

from memlayer import InvalidInputError, KVSession
from memlayer.kvretrieval import cluster_index
from memlayer.kvretrieval.squeezed import SqueezedSelector

SMALL = dict(n_init=2, n_local=8, block_size=4, topk=3, chunk_size=8)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def kmeans_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts FAISS k-means runs (each one head's keys, or one head's centroids)."""
    import faiss

    calls: list[int] = []
    real = faiss.Kmeans

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(faiss, "Kmeans", counted)
    return calls


def _regrouped(
    selector: SqueezedSelector, config: dict[str, Any], fed: int = 80, model: Any = None
) -> KVSession:
    session = KVSession(
        model if model is not None else tiny("llama"),
        None,
        progress=False,
        selector=selector,
        **config,
    )
    session.feed(_ids(fed, seed=3))
    assert session.cache.regroup() == len(session.cache.memories)
    return session


# -- through a session -----------------------------------------------------------------------


@pytest.mark.parametrize("hierarchical", [False, True], ids=["flat", "hierarchical"])
@pytest.mark.parametrize("family", ["llama", "llama-yarn"])
def test_every_cluster_kept_equals_dense(family: str, hierarchical: bool) -> None:
    """Clusters of 1-6 keys in pages of 4 rows (partly filled pages masked), every group
    opened: the logits of the tokens after the regroup equal the dense model's."""
    dense = tiny(family)
    ids = _ids(120, seed=3)
    with torch.no_grad():
        expected = dense(torch.tensor([ids])).logits[0]
    selector = SqueezedSelector(
        cluster_fraction=0.2, hierarchical=hierarchical, group_fraction=0.3, groups_kept=1000
    )
    session = _regrouped(selector, EXACT, fed=80, model=twin(dense))
    memory = session.cache.memories[0]
    assert memory.pages.partial  # some page holds fewer than 4 tokens for some head
    logits = session._forward(ids[80:], all_logits=True)
    torch.testing.assert_close(logits, expected[80:], rtol=1e-6, atol=1e-6)
    stats = session.stats()["selector"]
    assert stats["centroids_scored"] == stats["centroids_total"] > 0


def test_regrouped_pages_hold_exactly_the_fed_tokens() -> None:
    """Every sealed token is in exactly one row of one page per KV head, with its own key and
    value; a page holds one cluster; a cluster takes ceil(size / S) pages."""
    session = KVSession(
        tiny("llama"), None, progress=False, selector=SqueezedSelector(clusters=5), **SMALL
    )
    session.feed(_ids(90, seed=4))
    before = []
    for memory in session.cache.memories:
        keys, values = memory.pages.read()
        starts = list(memory.pages.starts)
        before.append((keys, values, starts))
    assert session.cache.regroup() == 2
    for memory, (keys, values, starts) in zip(session.cache.memories, before, strict=True):
        pages, size = memory.pages, memory.config.block_size
        index = memory.selector.index
        assert index is not None and index.fixed_pages == pages.count
        new_keys, new_values = pages.read()
        for head in range(keys.shape[1]):
            originals = {
                start + row: (keys[i, head, row], values[i, head, row])
                for i, start in enumerate(starts)
                for row in range(size)
            }
            seen: list[int] = []
            for page in range(pages.count):
                held = int(pages.lengths[page, head])
                rows = index.positions[page, head]
                assert (rows[:held] >= 0).all() and (rows[held:] == -1).all()
                for row, position in enumerate(rows[:held].tolist()):
                    key, value = originals[position]
                    assert torch.equal(new_keys[page, head, row], key)
                    assert torch.equal(new_values[page, head, row], value)
                    seen.append(position)
            assert sorted(seen) == sorted(originals)  # a permutation: nothing lost or doubled
            cluster = index.page_cluster[:, head]
            sizes = index.log_sizes[:, head].exp().round().long()
            for c in range(index.fixed_clusters):
                tokens = int(pages.lengths[: pages.count][cluster == c, head].sum())
                assert tokens == int(sizes[c])
                assert int((cluster == c).sum()) == math.ceil(tokens / size)


def test_pages_sealed_after_the_regroup_are_their_own_clusters() -> None:
    """A question's pages join the index as one-page clusters and leave with it."""
    session = _regrouped(SqueezedSelector(clusters=4), SMALL)
    memory = session.cache.memories[0]
    fixed = memory.pages.count
    index = memory.selector.index
    assert index is not None
    state = {name: tensor.clone() for name, tensor in index.state().items()}
    recorded: list[int] = []
    real = memory.selector.select

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        recorded.append(memory.selector.index.page_cluster.shape[0])
        return real(*args, **kwargs)

    memory.selector.select = spy  # type: ignore[method-assign]
    session.continue_ids(_ids(30, seed=8), 4)  # seals pages of its own while answering
    assert max(recorded) > fixed
    after = memory.selector.index.state()
    assert memory.pages.count == fixed
    assert all(torch.equal(state[name], after[name]) for name in state)


def test_save_and_load_keep_clusters_pages_and_thresholds_without_clustering_again(
    tmp_path: Path, kmeans_calls: list[int]
) -> None:
    model = tiny("llama")
    selector = SqueezedSelector(clusters=6, hierarchical=True, group_fraction=0.5)
    session = _regrouped(selector, SMALL, fed=100, model=model)
    layers, heads = 2, 2
    assert len(kmeans_calls) == 2 * layers * heads  # keys, then centroids, per head
    with session.cache.calibrating():
        session.continue_ids(_ids(12, seed=9), 1)
    question = _ids(10, seed=10)
    answer = session.continue_ids(question, 6)

    session.save(tmp_path / "saved")
    calls = len(kmeans_calls)
    loaded = KVSession.load(tmp_path / "saved", model, None, progress=False)
    assert len(kmeans_calls) == calls  # nothing clustered again
    assert loaded.selector == selector
    for before, after in zip(session.cache.memories, loaded.cache.memories, strict=True):
        count = before.pages.count
        assert after.pages.count == count
        assert torch.equal(after.pages.lengths[:count], before.pages.lengths[:count])
        for old, new in zip(before.pages.read(), after.pages.read(), strict=True):
            assert torch.equal(old, new)
        old_state, new_state = before.selector.state(), after.selector.state()
        assert old_state.keys() == new_state.keys() and "thresholds" in new_state
        assert all(torch.equal(old_state[k], new_state[k]) for k in old_state)
    assert loaded.continue_ids(question, 6) == answer
    with pytest.raises(InvalidInputError, match="regroup: the pages are already clustered"):
        loaded.cache.regroup()


def test_a_regrouped_step_reads_nothing_back_and_compiles_as_one_graph() -> None:
    """Thresholds and the two-level lookup stay on the device: -1 padded, static shapes."""
    selector = SqueezedSelector(
        clusters=6, hierarchical=True, group_fraction=0.5, groups_kept=1, threshold=0.05
    )
    session = _regrouped(selector, dict(SMALL, topk=12), fed=100)  # kept clusters' tails too
    chunks, tokens = _ids(24, seed=6), _ids(6, seed=7)
    with no_host_reads():
        session._forward(chunks)  # three chunks, sealing pages after the regroup
        for token in tokens:
            session._forward([token])
    memory = session.cache.memories[1]
    memory.append(torch.randn(2, 1, 16), torch.randn(2, 1, 16))
    query = torch.randn(1, 4, 1, 16)
    eager = memory.attend_resident(query, 0.25)
    torch._dynamo.reset()
    compiled = torch.compile(memory.attend_resident, fullgraph=True, backend="eager")
    assert torch.equal(compiled(query, 0.25), eager)
    stats = session.stats()
    assert 0 < stats["selector"]["centroids_scored"] < stats["selector"]["centroids_total"]
    assert 0 < stats["tokens_selected"] < stats["pages_selected"] * 4


def test_calibrating_sets_every_layers_thresholds_from_the_questions_run() -> None:
    session = _regrouped(SqueezedSelector(clusters=6, mass=0.8), SMALL)
    pages = [m.pages.count for m in session.cache.memories]
    with session.cache.calibrating():
        for seed in (11, 12):
            session.continue_ids(_ids(9, seed=seed), 2)
    for memory, count in zip(session.cache.memories, pages, strict=True):
        thresholds = memory.selector.thresholds
        assert thresholds is not None and thresholds.shape == (2,)
        assert ((thresholds > 0) & (thresholds <= 1)).all()
        assert memory.pages.count == count and memory.recorded is None


# -- the selector on synthetic keys ------------------------------------------------------------


def _clustered_keys(seed: int, heads: int = 2, length: int = 480, dim: int = 16) -> torch.Tensor:
    """Keys around 24 directions per head, of varied norms: [Hkv, T, D]."""
    gen = torch.Generator().manual_seed(seed)
    directions = cluster_index.unit(torch.randn(heads, 24, dim, generator=gen)) * 4
    pick = torch.randint(0, 24, (heads, length), generator=gen)
    noise = torch.randn(heads, length, dim, generator=gen) * 0.4
    return torch.gather(directions, 1, pick[..., None].expand(-1, -1, dim)) + noise


def _laid_out(selector: SqueezedSelector, seed: int = 0) -> SqueezedSelector:
    keys = _clustered_keys(seed)
    assert selector.layout(keys, torch.arange(keys.shape[1]), 16) is not None
    return selector


def _queries(seed: int, rows: int = 64, heads: int = 2, dim: int = 16) -> torch.Tensor:
    """Query rows [Hkv, N, D] along the keys' directions, 3× as long (logits ~ 12 at scale
    1/4 against ~ 3 for an unrelated cluster: sharp attention)."""
    keys = _clustered_keys(seed + 100)
    noise = torch.randn(heads, rows, dim, generator=torch.Generator().manual_seed(seed))
    return keys[:, :rows] * 3 + noise * 0.1


@pytest.mark.parametrize("threshold", [None, 0.01, 0.1])
def test_hierarchical_with_every_group_opened_keeps_what_flat_keeps(
    threshold: float | None,
) -> None:
    selector = _laid_out(
        SqueezedSelector(
            clusters=60, hierarchical=True, group_fraction=0.2, groups_kept=12, threshold=threshold
        )
    )
    index = selector.index
    assert index is not None and index.groups.shape[0] == 12  # 20% of 60
    for seed in range(4):
        q = _queries(seed)[:, seed * 4 : seed * 4 + 4][None].reshape(1, 2, 4, 16)
        q = q.repeat_interleave(2, dim=1)  # 2 query heads per KV head: [1, 4, 4, 16]
        flat = selector.kept_clusters(q, scale=0.25, explore=False)
        tree = selector.kept_clusters(q, scale=0.25, explore=True)
        assert torch.equal(flat, tree)
        if threshold is not None:
            assert 0 < int(flat.sum()) < flat.numel()  # the threshold really chooses
        rows = (q[0].reshape(2, -1, 16) * 0.25).float()
        torch.testing.assert_close(index.log_shares(rows, 12)[0], index.log_shares(rows)[0])


@pytest.mark.parametrize(("opened", "found"), [(2, 0.8), (6, 0.95)])
def test_opening_fewer_groups_scores_fewer_first_level_centroids(opened: int, found: float) -> None:
    """With `opened` of 12 groups opened, about opened/12 of the centroids are scored per
    step (groups are uneven: measured 19% with 2, 54% with 6), and the flat choice's best
    cluster is among them for most query rows (84% of 128 rows × 2 heads with 2 groups,
    98% with 6)."""
    selector = _laid_out(
        SqueezedSelector(clusters=60, hierarchical=True, group_fraction=0.2, groups_kept=opened)
    )
    rows = _queries(1, rows=128)
    hits, fractions = 0, []
    for row in range(128):
        q = rows[:, row : row + 1][None].repeat_interleave(2, dim=1)  # [1, 4, 1, 16]
        flat = selector._best_shares(q, 0.25, explore=False)
        before = selector.stats()
        tree = selector._best_shares(q, 0.25, explore=True)
        after = selector.stats()
        assert before["centroids_scored"] == before["centroids_total"]  # flat: every one
        scored = after["centroids_scored"] - before["centroids_scored"]
        total = after["centroids_total"] - before["centroids_total"]
        assert 0 < scored < total
        fractions.append(scored / total)
        hits += int((tree.argmax(dim=-1) == flat.argmax(dim=-1)).sum())
        selector._scored, selector._possible = None, 0
    assert hits / 256 >= found
    assert sum(fractions) / len(fractions) < opened / 12 + 0.1


def test_a_page_budget_goes_to_the_pages_carrying_most_attention_not_to_a_big_cluster() -> None:
    """A passkey among filler: 256 filler keys (one cluster over 16 pages of 16) the query
    matches moderately, 8 needle keys (one cluster, one page) it matches 3 logits better. The
    filler cluster's share is 32 × e^-3 ≈ 1.6 times the needle's, but each filler page holds
    1/16 of it: with a budget of one page, the needle's page is the one read."""
    dim, filler, needle = 16, 256, 8
    a, b = torch.eye(dim)[0], torch.eye(dim)[1]
    gen = torch.Generator().manual_seed(0)
    keys = torch.cat([a.expand(filler, dim), b.expand(needle, dim)])
    keys = (keys + torch.randn(filler + needle, dim, generator=gen) * 0.01)[None]  # [1, T, D]
    selector = SqueezedSelector(clusters=2)
    layout = selector.layout(keys, torch.arange(filler + needle), 16)
    assert layout is not None and layout.summaries.shape[0] == 17  # 16 filler pages + 1
    query = (2.0 * a + 5.0 * b)[None, None, None]  # logits 2 and 5 at scale 1
    chosen = selector.select(query, layout.summaries, 1, scale=1.0)
    needle_page = int(selector.index.page_cluster[:, 0].bincount().argmin())  # the 1-page one
    assert chosen.tolist() == [[[needle_page]]]


@pytest.mark.parametrize(("mass", "coverage"), [(0.9, 1.0), (0.5, 0.8), (0.99, 0.9)])
def test_calibration_keeps_its_target_mass_on_the_calibration_queries(
    mass: float, coverage: float
) -> None:
    selector = _laid_out(SqueezedSelector(clusters=60, mass=mass, coverage=coverage))
    rows = _queries(2, rows=200)
    selector.calibrate(rows, scale=0.25)
    assert selector.thresholds is not None
    index = selector.index
    assert index is not None
    shares, _ = index.log_shares(rows.float() * 0.25)
    kept = shares >= selector.thresholds.log()[:, None, None]
    kept_mass = (shares.exp() * kept).sum(dim=-1)  # [Hkv, N]
    reached = (kept_mass >= mass - 1e-6).float().mean(dim=1)
    assert (reached >= coverage).all(), (reached, kept.float().mean())
    assert kept.float().mean() < 0.5  # and it does not keep everything to get there
    if coverage < 1:  # nor more rows than asked: the quantile is the tight one
        assert (reached < coverage + 0.05).all(), reached


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cluster_fraction": 0.0}, "cluster_fraction: must be in \\(0, 1\\]"),
        ({"cluster_fraction": 1.5}, "cluster_fraction: must be in \\(0, 1\\]"),
        ({"clusters": 0}, "clusters: must be an integer of at least 1"),
        ({"threshold": 0.0}, "threshold: must be in \\(0, 1\\]"),
        ({"threshold": 1.2}, "threshold: must be in \\(0, 1\\]"),
        ({"threshold": "high"}, "threshold: must be a number in \\(0, 1\\]"),
        ({"mass": -0.1}, "mass: must be in \\(0, 1\\]"),
        ({"coverage": 2}, "coverage: must be in \\(0, 1\\]"),
        ({"group_fraction": 0}, "group_fraction: must be in \\(0, 1\\]"),
        ({"groups_kept": 0}, "groups_kept: must be an integer of at least 1"),
        ({"hierarchical": "yes"}, "hierarchical: must be true or false"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        SqueezedSelector(**options)
    with pytest.raises(InvalidInputError, match=message):
        KVSession(tiny("llama"), None, progress=False, selector=SqueezedSelector(**options))


def _snapshot(session: KVSession) -> list[Any]:
    return [
        (
            m.pages.count,
            m.pages.lengths[: m.pages.count].clone(),
            {k: v.clone() for k, v in m.selector.state().items()},
        )
        for m in session.cache.memories
    ]


def _same(a: list[Any], b: list[Any]) -> bool:
    return all(
        x[0] == y[0]
        and torch.equal(x[1], y[1])
        and x[2].keys() == y[2].keys()
        and all(torch.equal(x[2][k], y[2][k]) for k in x[2])
        for x, y in zip(a, b, strict=True)
    )


def test_regrouping_or_calibrating_at_the_wrong_time_is_refused_and_changes_nothing(
    kmeans_calls: list[int],
) -> None:
    short = KVSession(tiny("llama"), None, progress=False, selector="squeezed", **SMALL)
    short.feed(_ids(9, seed=1))  # sinks and window only: no page to cluster
    with pytest.raises(InvalidInputError, match="context: has no sealed pages to regroup"):
        short.cache.regroup()
    assert kmeans_calls == []

    session = KVSession(tiny("llama"), None, progress=False, selector="squeezed", **SMALL)
    session.feed(_ids(60, seed=2))
    before = _snapshot(session)
    question = _ids(5, seed=3)
    refused = pytest.raises(InvalidInputError, match="calibrate: regroup the fixed context first")
    with refused, session.cache.calibrating():
        session.continue_ids(question, 1)
    assert _same(before, _snapshot(session))

    session.cache.regroup()
    regrouped = _snapshot(session)
    calls = len(kmeans_calls)
    with pytest.raises(InvalidInputError, match="regroup: the pages are already clustered"):
        session.cache.regroup()
    refused = pytest.raises(InvalidInputError, match="queries: none ran inside calibrating")
    with refused, session.cache.calibrating():
        pass
    memory = session.cache.memories[0]
    with pytest.raises(InvalidInputError, match="queries: must be rows"):
        memory.selector.calibrate(torch.randn(3, 4, 16), scale=0.25)
    assert len(kmeans_calls) == calls
    assert _same(regrouped, _snapshot(session))
    assert all(m.selector.thresholds is None for m in session.cache.memories)


def test_selectors_without_a_layout_are_left_as_sealed() -> None:
    session = KVSession(tiny("llama"), None, progress=False, selector="quest", **SMALL)
    session.feed(_ids(60, seed=2))
    count = session.stats()["pages"]
    assert session.cache.regroup() == 0
    assert session.stats()["pages"] == count
    assert not session.cache.memories[0].pages.partial
