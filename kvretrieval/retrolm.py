"""RetroLM: KV-level retrieval of whole pages, one selection per question for every layer.

The context is partitioned into contiguous pages (the KV memory's sealed pages). A page's
summary is its mean key per KV head (as ReKV's). When a question comes, a retrieval pass
records each layer's question queries (`memlayer.kvretrieval.question_pages`), and the page
retriever ranks the pages once for all layers:

- **training-free**: in each layer and KV head, the group's mean question query · each
  page's mean key (the query's attention-space similarity), standardised over the pages
  (z-scores, so layers and heads of different scales vote alike), averaged over a band of
  layers;
- **trained**: a small scorer over the same features (`PageRetriever`), trained
  contrastively on (question, page holding the answer) pairs and loaded from a safetensors
  file (`RetroLMSelector(retriever="retriever.safetensors")`).

The top-k pages' KV (not their text) is then attended by every layer for the question and
its answer. While text is fed, the selector scores pages per layer and step like ReKV.
The paper trains bookmark-token projections inside the model; here the model is untouched.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from memlayer.errors import InvalidInputError
from memlayer.kvretrieval.page_retriever import PageRetriever, head_z_scores
from memlayer.kvretrieval.selectors import SELECTORS, ReKVSelector


def question_features(queries: list[torch.Tensor], kv_heads: int) -> torch.Tensor:
    """Per layer and KV head, the mean question query [L, Hkv, D] (float32) of each layer's
    queries [1, Hq, T, D], averaged over the question's tokens and the group's heads."""
    rows = []
    for query in queries:
        dim = query.shape[-1]
        rows.append(query[0].float().mean(dim=1).reshape(kv_heads, -1, dim).mean(dim=1))
    return torch.stack(rows)


def page_features(summaries: list[torch.Tensor]) -> torch.Tensor:
    """Per layer, each page's mean key per KV head [L, P, Hkv, D] (float32) from summaries
    [P, Hkv, R, D] (R rows averaged)."""
    return torch.stack([summary.float().mean(dim=2) for summary in summaries])


def layer_band(layers: int, band: tuple[float, float]) -> slice:
    """The layers [first, last) that a band of fractions of the model's depth covers (at
    least one layer)."""
    first = min(int(band[0] * layers), layers - 1)
    last = max(first + 1, round(band[1] * layers))
    return slice(first, last)


def training_free_scores(
    questions: torch.Tensor, pages: torch.Tensor, band: slice = slice(None)
) -> torch.Tensor:
    """Page scores [P]: per layer and KV head, mean question query · mean page key
    ([L, Hkv, D] · [L, P, Hkv, D]), z-scored over the pages, averaged over `band`'s layers
    and all heads."""
    return head_z_scores(questions[band], pages[band]).mean(dim=(0, 1))


@SELECTORS.register("retrolm")
@dataclass
class RetroLMSelector(ReKVSelector):
    """RetroLM page retrieval: one selection of `topk` pages per question, for every layer.

    `retriever`: None (training-free ranking) or the path of a trained `PageRetriever`
    safetensors file (refused for a model of another geometry, or of other weights when the
    file keeps the fingerprint of the model it was trained on). `layers`: the band of the
    model's depth, as fractions (first, last), whose layers vote in the training-free
    ranking (a trained retriever uses the band it was trained on).
    """

    retriever: str | None = None
    layers: tuple[float, float] = (0.0, 1.0)
    name: ClassVar[str] = "retrolm"
    shares_selection: ClassVar[bool] = True
    selects_per_question: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.retriever is not None:
            if not isinstance(self.retriever, (str, os.PathLike)):
                raise InvalidInputError("retriever", "must be a file path or None", self.retriever)
            self.retriever = os.fspath(self.retriever)
        band = self.layers
        if (
            not isinstance(band, (tuple, list))
            or len(band) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in band)
            or not 0 <= band[0] < band[1] <= 1
        ):
            raise InvalidInputError(
                "layers", "must be two fractions of the depth, 0 <= first < last <= 1", band
            )
        self.layers = (float(band[0]), float(band[1]))
        self._scorer = PageRetriever.load(self.retriever) if self.retriever else None

    def __deepcopy__(self, memo: dict[int, Any]) -> RetroLMSelector:
        """Layer copies share the loaded retriever (read-only) instead of copying it."""
        clone = copy.copy(self)
        memo[id(self)] = clone
        return clone

    @property
    def scorer(self) -> PageRetriever | None:
        """The loaded trained retriever, if any."""
        return self._scorer

    def check_model(
        self, layers: int, kv_heads: int, head_dim: int, fingerprint: str | None = None
    ) -> None:
        if self._scorer is not None:
            source = f"the page retriever {self.retriever}"
            self._scorer.check(layers, kv_heads, head_dim, fingerprint, source=source)

    def rank(self, queries: list[torch.Tensor], summaries: list[torch.Tensor]) -> torch.Tensor:
        """Scores [P] of the pages for a question (see `choose`)."""
        kv_heads = summaries[0].shape[1]
        questions = question_features(queries, kv_heads)
        pages = page_features(summaries)
        if self._scorer is not None:
            return self._scorer.scores(questions, pages)
        return training_free_scores(questions, pages, layer_band(len(queries), self.layers))

    def choose(
        self, queries: list[torch.Tensor], summaries: list[torch.Tensor], k: int
    ) -> torch.Tensor:
        scores = self.rank(queries, summaries)
        return torch.sort(torch.topk(scores, k).indices).values
