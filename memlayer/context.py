"""Context strategies: turn what memory recalls for a query into one prompt string within a
token budget.

A strategy is a small class registered by name in `STRATEGIES`; `Memory.context(strategy=...)`
takes a name or an instance. It is handed a `Recall` (the query, the candidates memory can
rank for it with their embeddings, the embedder and the tokenizer) and a budget:

- `ranked` packs the best hits first, each labelled with its id;
- `crag` (clustered context) retrieves a wide candidate set, clusters the candidates'
  embeddings and keeps one compact representative per cluster: the sentences that best cover
  it (extractive, the default) or a summary from a user's `Summarizer` (abstractive, cached).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Protocol

import numpy as np

from memlayer.chunking import split_sentences
from memlayer.errors import InvalidInputError
from memlayer.extractive import (
    PART_SEPARATOR,
    SENTENCE_SEPARATOR,
    Picked,
    Sentence,
    SentenceVectors,
    pick,
)
from memlayer.registry import Registry
from memlayer.retrievers.clusters import Clustering, cluster
from memlayer.summarizer import Summarizer, SummaryCache
from memlayer.threads import one_thread
from memlayer.tokens import Tokenizer, fit_tokens
from memlayer.types import Hit

SEPARATOR = "\n\n"


@dataclass(frozen=True)
class ContextPart:
    """One piece of a context and the ids of the memories it was taken from."""

    text: str
    ids: list[str]


@dataclass(frozen=True)
class Context:
    """A packed prompt context: its text, the ids of the memories it draws on (in order), its
    size under the tokenizer it was counted with, and its parts with their sources."""

    text: str
    ids: list[str]
    tokens: int
    parts: list[ContextPart] = field(default_factory=list)


@dataclass(frozen=True)
class Candidates:
    """Hits best first, with their unit embeddings (row i for hits[i]) and the query's."""

    hits: list[Hit]
    vectors: np.ndarray
    query_vector: np.ndarray


class Recall(Protocol):
    """What a strategy may ask of memory for one query."""

    query: str
    k: int  # how many hits the caller asked for
    embedder: str  # the embedder's name (vectors of two embedders never mix)
    tokenizer: Tokenizer

    def hits(self, n: int) -> list[Hit]:
        """The n best hits for the query, best first."""
        ...

    def candidates(self, n: int) -> Candidates:
        """The n best hits with their embeddings."""
        ...

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors of texts, by the embedder that embedded the memories."""
        ...


class ContextStrategy(Protocol):
    """Packs what `recall` offers into a context of at most `budget_tokens` tokens."""

    def pack(self, recall: Recall, budget_tokens: int) -> Context: ...


STRATEGIES: Registry[ContextStrategy] = Registry("strategy")


@STRATEGIES.register("ranked")
class RankedContext:
    """The k best hits first, each labelled with its id; the last one is cut to fit."""

    def pack(self, recall: Recall, budget_tokens: int) -> Context:
        count = recall.tokenizer
        parts: list[ContextPart] = []
        used = 0
        separator = count(SEPARATOR)
        for hit in recall.hits(recall.k):
            label = f"[{hit.id}] "
            joint = separator if parts else 0
            room = budget_tokens - used - joint
            cost = count(label + hit.text)
            if cost > room:
                text = fit_tokens(label + hit.text, room, count)
                if len(text) > len(label):
                    parts.append(ContextPart(text, [hit.id]))
                break
            parts.append(ContextPart(label + hit.text, [hit.id]))
            used += cost + joint
        context = _assemble(parts, SEPARATOR, count)
        while context.tokens > budget_tokens:  # a tokenizer that counts the whole as more
            last = parts.pop()
            cut = fit_tokens(last.text, count(last.text) - (context.tokens - budget_tokens), count)
            if cut.partition("] ")[2]:
                parts.append(ContextPart(cut, last.ids))
            context = _assemble(parts, SEPARATOR, count)
        return context


@STRATEGIES.register("crag")
@dataclass
class CragContext:
    """Clustered context: one compact representative per cluster of the retrieved candidates.

    Candidates: at least `min_candidates` (or the call's k), doubled up to `max_candidates`
    while their query similarities stay flat (best tenth and weakest tenth less than
    `flat_spread` apart: the relevant set goes on beyond them); then (extractive, with
    `widen_to_fill`) doubled again and packed again while packing runs dry and widening
    adds to the context. Dry: every cluster's sentences were taken or dropped as
    duplicates, the budget turned none away and still has room for a typical sentence, so
    these candidates have nothing left to say that the budget could hold and the
    next-ranked memories may. Clusters: FAISS k-means
    (k-means++ starts, seeded by `seed`) over the candidates' stored embeddings, for k on a
    grid up to `max_clusters` and up to what the budget holds at one typical sentence per
    cluster; the most clusters whose silhouette is within `silhouette_tolerance` of the best.
    Per cluster, most query-relevant cluster first:

    - extractive (no `summarizer`): the sentences of its `members_per_cluster` most central
      members, scored by cosine to the centroid plus `query_weight` × cosine to the query;
      one per cluster per round while the budget lasts, each the best score minus `novelty`
      × its cosine with the closest sentence already taken; one within `duplicate` cosine of
      a taken sentence is dropped;
    - abstractive: `summarizer(texts, max_tokens)` over its `summary_members` most central
      members, the budget shared by cluster size; cached by cluster content.
    """

    summarizer: Summarizer | None = None
    min_candidates: int = 50
    max_candidates: int = 500
    flat_spread: float = 0.3
    widen_to_fill: bool = True
    max_clusters: int = 32
    members_per_cluster: int = 8
    query_weight: float = 1.0
    duplicate: float = 0.9
    novelty: float = 1.0
    silhouette_tolerance: float = 0.05
    summary_members: int = 16
    seed: int = 0
    _summaries: SummaryCache | None = field(init=False, repr=False, default=None)
    _sentences: SentenceVectors = field(init=False, repr=False, default_factory=SentenceVectors)

    def __post_init__(self) -> None:
        for name in (
            "min_candidates",
            "max_candidates",
            "max_clusters",
            "members_per_cluster",
            "summary_members",
        ):
            _positive_int(name, getattr(self, name))
        if self.max_candidates < self.min_candidates:
            raise InvalidInputError("max_candidates", "must be at least min_candidates")
        for name in ("flat_spread", "query_weight", "duplicate", "novelty", "silhouette_tolerance"):
            _finite(name, getattr(self, name))
        if not isinstance(self.widen_to_fill, bool):
            raise InvalidInputError("widen_to_fill", "must be true or false", self.widen_to_fill)
        if self.summarizer is not None:
            self._summaries = SummaryCache(self.summarizer)

    def pack(self, recall: Recall, budget_tokens: int) -> Context:
        count = cache(recall.tokenizer)  # each sentence is counted once per call
        found, asked = self._candidates(recall)
        if not found.hits:
            return Context("", [], 0)
        context, dry = self._pack(found, recall, budget_tokens, count)
        while dry and len(found.hits) == asked < self.max_candidates:
            asked = min(2 * asked, self.max_candidates)  # look further down the ranking
            wider = recall.candidates(asked)
            if len(wider.hits) <= len(found.hits):
                break
            found = wider
            widened, dry = self._pack(found, recall, budget_tokens, count)
            if widened.tokens <= context.tokens:  # the next-ranked memories added nothing
                break
            context = widened
        return context

    def _pack(
        self, found: Candidates, recall: Recall, budget_tokens: int, count: Tokenizer
    ) -> tuple[Context, bool]:
        """The context of these candidates, and whether packing ran dry: `widen_to_fill`
        is on, extractive, the budget turned no sentence away, and it has room left for
        at least one typical sentence."""

        @cache
        def sentences(row: int) -> tuple[str, ...]:  # split only the candidates looked at
            text = found.hits[row].text
            return tuple(split_sentences(text)) or (text.strip(),)

        with one_thread():
            typical = _typical_sentence(sentences, len(found.hits), count)
            groups = _clusters(found, min(self.max_clusters, budget_tokens // typical), self)
            order = [
                int(c) for c in np.argsort(-(groups.centroids @ found.query_vector), kind="stable")
            ]
        if self._summaries is not None:
            parts = _abstractive(
                self._summaries,
                found,
                groups,
                order,
                budget_tokens,
                typical,
                count,
                self.summary_members,
            )
            return _assemble_within(parts, budget_tokens, count), False
        picked = self._extractive(found, sentences, groups, order, budget_tokens, recall, count)
        parts = [
            [_Piece(s.text, [found.hits[s.source].id]) for s in chosen]
            for chosen in picked.sentences
            if chosen
        ]
        context = _assemble_within(parts, budget_tokens, count)
        room = budget_tokens - context.tokens
        return context, self.widen_to_fill and not picked.budget_bound and room >= typical

    def _candidates(self, recall: Recall) -> tuple[Candidates, int]:
        """The candidate set, widened while the query similarities stay flat, and how many
        were asked for."""
        n = min(max(recall.k, self.min_candidates), self.max_candidates)
        while True:
            found = recall.candidates(n)
            if len(found.hits) < n or n >= self.max_candidates or not self._flat(found):
                return found, n
            n = min(2 * n, self.max_candidates)

    def _flat(self, found: Candidates) -> bool:
        similarity = np.sort(found.vectors @ found.query_vector)
        tenth = max(1, len(similarity) // 10)
        return float(similarity[-tenth:].mean() - similarity[:tenth].mean()) < self.flat_spread

    def _extractive(
        self,
        found: Candidates,
        sentences: Callable[[int], tuple[str, ...]],
        groups: Clustering,
        order: list[int],
        budget: int,
        recall: Recall,
        count: Tokenizer,
    ) -> Picked:
        """Per cluster, the sentences that best cover it and the query (see the class)."""
        members = [_central(found, groups, c, self.members_per_cluster) for c in order]
        split = sorted(
            {s for rows in members for i in rows if len(sentences(i)) > 1 for s in sentences(i)}
        )
        vectors = dict(
            zip(split, self._sentences.vectors(split, recall.embedder, recall.embed), strict=True)
        )
        with one_thread():
            pools = [
                _pool(rows, sentences, found, vectors, groups.centroids[c], self.query_weight)
                for c, rows in zip(order, members, strict=True)
            ]
            picked = pick(pools, budget, count, self.duplicate, self.novelty)
        if not any(picked.sentences):
            shortest = min(count(s.text) for pool in pools for s in pool)
            raise InvalidInputError(
                "budget_tokens",
                f"must hold at least one sentence (the shortest one here takes {shortest})",
                budget,
            )
        return picked


@dataclass(frozen=True)
class _Piece:
    """A sentence or summary of a CRAG part and the memories it came from."""

    text: str
    ids: list[str]


def _abstractive(
    summaries: SummaryCache,
    found: Candidates,
    groups: Clustering,
    order: list[int],
    budget: int,
    typical: int,
    count: Tokenizer,
    members: int,
) -> list[list[_Piece]]:
    """Per cluster, the summarizer's summary of its most central members, in a share of
    the budget proportional to the cluster's size (at least one typical sentence)."""
    sizes = np.bincount(groups.labels, minlength=groups.k)
    parts: list[list[_Piece]] = []
    left = budget
    for c in order:
        allowance = min(
            left - (count(PART_SEPARATOR) if parts else 0),
            max(typical, budget * int(sizes[c]) // len(found.hits)),
        )
        if allowance < typical:
            break
        rows = _central(found, groups, c, members, query_weight=0.0)
        texts = [found.hits[i].text for i in rows]
        summary = summaries.summary(texts, allowance, count)
        parts.append([_Piece(summary, [found.hits[i].id for i in rows])])
        left -= count(summary) + (count(PART_SEPARATOR) if len(parts) > 1 else 0)
    if not parts:
        raise InvalidInputError(
            "budget_tokens", f"must hold at least one sentence ({typical} tokens)", budget
        )
    return parts


def _clusters(found: Candidates, limit: int, crag: CragContext) -> Clustering:
    """The clustering of the candidates, computed in id order so that it depends on the
    candidate set, not on how retrieval happened to order it."""
    order = np.argsort([hit.id for hit in found.hits], kind="stable")
    groups = cluster(
        found.vectors[order], limit, seed=crag.seed, tolerance=crag.silhouette_tolerance
    )
    labels = np.empty_like(groups.labels)
    labels[order] = groups.labels
    return Clustering(labels, groups.centroids, groups.silhouette)


def _central(
    found: Candidates, groups: Clustering, c: int, n: int, query_weight: float = 1.0
) -> list[int]:
    """The n members of cluster c closest to its centroid (plus query_weight × closeness to
    the query), best first; ties keep retrieval order."""
    rows = np.flatnonzero(groups.labels == c)
    score = found.vectors[rows] @ groups.centroids[c]
    if query_weight:
        score = score + query_weight * (found.vectors[rows] @ found.query_vector)
    return [int(rows[i]) for i in np.argsort(-score, kind="stable")[:n]]


def _pool(
    rows: list[int],
    sentences: Callable[[int], tuple[str, ...]],
    found: Candidates,
    vectors: dict[str, np.ndarray],
    centroid: np.ndarray,
    query_weight: float,
) -> list[Sentence]:
    """The distinct sentences of these members, scored and best first."""
    pool: list[Sentence] = []
    seen: set[str] = set()
    for row in rows:
        for text in sentences(row):
            key = " ".join(text.casefold().split())
            if key in seen:
                continue
            seen.add(key)
            vector = vectors[text] if len(sentences(row)) > 1 else found.vectors[row]
            closeness = vector @ centroid + query_weight * (vector @ found.query_vector)
            score = float(closeness) / (1 + query_weight)  # a cosine scale, as MMR's overlap
            pool.append(Sentence(text, row, vector, score))
    return sorted(pool, key=lambda s: -s.score)


def _typical_sentence(
    sentences: Callable[[int], tuple[str, ...]], n: int, count: Tokenizer, sample: int = 16
) -> int:
    """Median token count of the first sentences of the best candidates (at least 1)."""
    sizes = [count(sentences(row)[0]) for row in range(min(n, sample))]
    return max(1, int(np.median(sizes)))


def _assemble_within(parts: list[list[_Piece]], budget: int, count: Tokenizer) -> Context:
    """The context of these parts; should a tokenizer count the joined text longer than its
    pieces, the last sentences are dropped until it fits."""
    parts = [list(part) for part in parts]
    while True:
        built = [
            ContextPart(SENTENCE_SEPARATOR.join(p.text for p in part), _unique(part))
            for part in parts
        ]
        context = _assemble(built, PART_SEPARATOR, count)
        if context.tokens <= budget:
            return context
        parts[-1].pop()
        if not parts[-1]:
            parts.pop()


def _unique(pieces: Sequence[_Piece]) -> list[str]:
    return list(dict.fromkeys(rid for piece in pieces for rid in piece.ids))


def _assemble(parts: list[ContextPart], separator: str, count: Tokenizer) -> Context:
    text = separator.join(part.text for part in parts)
    ids = list(dict.fromkeys(rid for part in parts for rid in part.ids))
    return Context(text=text, ids=ids, tokens=count(text), parts=parts)


def _finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError(name, "must be a finite number", value)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(name, "must be an integer >= 1", value)
