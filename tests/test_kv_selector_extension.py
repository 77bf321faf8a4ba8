"""A new selector is one class: defined here, run through KVSession, saved and loaded.

`CentroidIndex` keeps its own index over the layer's pages (each page's mean key per KV
head), kept in step by the hooks: rows added when pages are sealed, dropped on restore,
saved and loaded with the session. It scores from that index, not from the summaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from kv_models import EXACT, tiny, twin

from memlayer import InvalidInputError, KVSession
from memlayer.kvretrieval.selectors import SELECTORS, PageSelector

SMALL = dict(n_init=2, n_local=8, block_size=4, topk=2, chunk_size=8)


@dataclass
class CentroidIndex(PageSelector):
    """Pages scored by the group query against the page's mean key, from a per-layer index."""

    name: ClassVar[str] = "centroid-test"
    temperature: float = 1.0
    centroids: torch.Tensor | None = field(default=None, repr=False)

    @property
    def summary_rows(self) -> int:
        return 1

    def summarize(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return keys[:, :, :1]  # unused by score: the index holds what scoring needs

    def sealed(self, first: int, keys: torch.Tensor, summaries: torch.Tensor) -> None:
        rows = keys.float().mean(dim=2)  # [N, Hkv, D]
        assert first == (0 if self.centroids is None else self.centroids.shape[0])
        self.centroids = rows if self.centroids is None else torch.cat([self.centroids, rows])

    def truncate(self, count: int) -> None:
        if self.centroids is not None:
            self.centroids = self.centroids[:count]

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.centroids is None else {"centroids": self.centroids}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.centroids = state.get("centroids")

    def options(self) -> dict[str, float]:
        return {"temperature": self.temperature}

    def score(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        assert self.centroids is not None and self.centroids.shape[0] == summaries.shape[0]
        kv_heads = self.centroids.shape[1]
        group = queries[0].float().mean(dim=1).reshape(kv_heads, -1, queries.shape[-1]).mean(1)
        return torch.einsum("hd,phd->hp", group, self.centroids)[None] / self.temperature


SELECTORS.register(CentroidIndex.name)(CentroidIndex)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rows(session: KVSession) -> list[int]:
    return [
        0 if m.selector.centroids is None else m.selector.centroids.shape[0]
        for m in session.cache.memories
    ]


def test_a_new_selector_selecting_every_page_equals_dense() -> None:
    dense = tiny("llama")
    ids = _ids(90, seed=3)
    with torch.no_grad():
        expected = dense(torch.tensor([ids])).logits[0]
    session = KVSession(twin(dense), None, progress=False, selector=CentroidIndex(), **EXACT)
    logits = session._forward(ids, all_logits=True)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    pages = session.cache.memories[0].pages.count
    assert pages > 0 and _rows(session) == [pages] * len(session.cache.memories)
    # one copy per layer, so each layer's index is its own
    selectors = {id(m.selector) for m in session.cache.memories}
    assert len(selectors) == len(session.cache.memories)


def test_its_index_is_dropped_with_a_questions_pages_and_survives_save_and_load(
    tmp_path: Path,
) -> None:
    model = tiny("llama")
    session = KVSession(model, None, progress=False, selector="centroid-test", **SMALL)
    session.feed(_ids(120, seed=5))
    fed_rows = _rows(session)
    question = _ids(30, seed=6)  # long enough to seal pages of its own while answering
    answer = session.continue_ids(question, 6)
    assert _rows(session) == fed_rows  # restored with the pages
    assert [m.pages.count for m in session.cache.memories] == fed_rows

    session.save(tmp_path / "saved")
    loaded = KVSession.load(tmp_path / "saved", model, None, progress=False)
    assert isinstance(loaded.cache.memories[0].selector, CentroidIndex)
    for before, after in zip(session.cache.memories, loaded.cache.memories, strict=True):
        assert before.selector.centroids is not None and after.selector.centroids is not None
        torch.testing.assert_close(after.selector.centroids, before.selector.centroids)
    assert loaded.continue_ids(question, 6) == answer


def test_saved_options_rebuild_a_named_selector_and_bad_ones_are_refused(tmp_path: Path) -> None:
    model = tiny("llama")
    session = KVSession(
        model, None, progress=False, selector=CentroidIndex(temperature=2.0), **SMALL
    )
    session.feed(_ids(60, seed=7))
    session.save(tmp_path / "saved")
    loaded = KVSession.load(tmp_path / "saved", model, None, progress=False)
    assert loaded.selector == CentroidIndex(temperature=2.0)

    with pytest.raises(InvalidInputError, match=r"selector: must be one of .*infllm"):
        KVSession(model, None, progress=False, selector="no-such-selector")
    with pytest.raises(InvalidInputError, match="selector: must be a name or a PageSelector"):
        KVSession(model, None, progress=False, selector=3)
    with pytest.raises(InvalidInputError, match=r"repr_topk: is InfLLM's option: selector="):
        KVSession(model, None, progress=False, repr_topk=8)
    with pytest.raises(InvalidInputError, match="repr_topk: must be a positive integer"):
        KVSession(model, None, progress=False, selector=SELECTORS.create("infllm", repr_topk=0))


def test_infllm_keeps_the_mean_of_its_representative_keys_and_scores_by_its_definition() -> None:
    """One row per page, the mean of the `repr_topk` keys the chunk's mean group query
    attends to most; the score is the float64 Σ over heads of mean group query · that mean
    (and summaries of 0.2, the keys themselves, are adopted as their mean)."""
    gen = torch.Generator().manual_seed(3)
    selector = SELECTORS.create("infllm", repr_topk=3)
    keys = torch.randn(5, 2, 8, 16, generator=gen)  # [N, Hkv, S, D]
    chunk = torch.randn(4, 6, 16, generator=gen)  # [Hq, T, D]
    summaries = selector.summarize(keys, chunk)
    group_query = chunk.double().reshape(2, -1, 16).mean(dim=1)  # [Hkv, D]
    attended = torch.einsum("gd,ngsd->ngs", group_query, keys.double())
    top = attended.topk(3, dim=-1).indices
    chosen = torch.gather(keys.double(), 2, top[..., None].expand(-1, -1, -1, 16))
    assert summaries.shape == (5, 2, 1, 16)
    torch.testing.assert_close(summaries[:, :, 0].double(), chosen.mean(dim=2))
    torch.testing.assert_close(selector.adopt_summaries(chosen.float()), summaries)

    queries = torch.randn(1, 4, 3, 16, generator=gen)
    step_query = queries[0].double().reshape(2, 2, 3, 16).mean(dim=2).sum(dim=1)  # [Hkv, D]
    expected = torch.einsum("gd,ngd->n", step_query, chosen.mean(dim=2))
    scores = selector.score(queries, summaries)
    assert scores.shape == (1, 2, 5)
    torch.testing.assert_close(scores[0, 0].double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[0, 1], scores[0, 0])  # every head shares the selection
