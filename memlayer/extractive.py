"""Extractive cluster summaries: for each cluster, the sentences closest to its centroid and to
the query, de-duplicated across the whole context, taken round-robin over the clusters (most
relevant cluster first) while the token budget lasts. No model is called but the embedder,
and only for sentences it has not embedded before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from memlayer.tokens import Tokenizer

PART_SEPARATOR = "\n"
SENTENCE_SEPARATOR = " "


@dataclass(frozen=True)
class Sentence:
    """One sentence of candidate `source`, its unit vector, and how well it covers its cluster
    and the query (higher is better)."""

    text: str
    source: int
    vector: np.ndarray
    score: float


class SentenceVectors:
    """Unit vectors of sentences by (embedder, text), LRU-bounded, so repeated and overlapping
    queries embed each sentence once."""

    def __init__(self, size: int = 20_000) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    def vectors(
        self, texts: Sequence[str], embedder: str, embed: Callable[[list[str]], np.ndarray]
    ) -> list[np.ndarray]:
        """The vectors of `texts`, embedding the ones not cached in one batch."""
        with self._lock:
            found = [self._entries.get((embedder, text)) for text in texts]
        missing = sorted({t for t, v in zip(texts, found, strict=True) if v is None})
        if missing:
            fresh = dict(zip(missing, embed(missing), strict=True))
            with self._lock:
                for text, vector in fresh.items():
                    self._entries[(embedder, text)] = vector
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            found = [v if v is not None else fresh[t] for t, v in zip(texts, found, strict=True)]
        return [v for v in found if v is not None]


@dataclass(frozen=True)
class Picked:
    """The sentences taken per pool, and whether the budget turned any sentence away
    (False: every pool was used up, taken or dropped as a duplicate, within the budget)."""

    sentences: list[list[Sentence]]
    budget_bound: bool


def pick(
    pools: Sequence[Sequence[Sentence]],
    budget: int,
    count: Tokenizer,
    duplicate: float,
    novelty: float,
) -> Picked:
    """Sentences per pool, one per pool per round (pools in order) while `budget` tokens last,
    separators counted. Each turn takes the pool's sentence of best score minus `novelty` ×
    its highest cosine with a sentence already taken (maximal marginal relevance), so a
    cluster's second sentence says something its first did not; a sentence within
    `duplicate` cosine of one taken, or one that no longer fits, is dropped."""
    picked: list[list[Sentence]] = [[] for _ in pools]
    bound = False
    vectors = [np.stack([s.vector for s in pool]) if pool else None for pool in pools]
    scores = [np.array([s.score for s in pool]) for pool in pools]
    # each sentence's highest cosine with those taken so far, updated as sentences are taken
    overlaps = [np.full(len(pool), -np.inf) for pool in pools]
    open_ = [np.ones(len(pool), dtype=bool) for pool in pools]
    part_cost, sentence_cost = count(PART_SEPARATOR), count(SENTENCE_SEPARATOR)
    used = 0
    taken_any = False
    progress = True
    while progress:
        progress = False
        for index, pool in enumerate(pools):
            while open_[index].any():
                overlap = overlaps[index] if taken_any else np.zeros(len(pool))
                value = np.where(open_[index], scores[index] - novelty * overlap, -np.inf)
                best = int(np.argmax(value))
                open_[index][best] = False
                sentence = pool[best]
                joint = sentence_cost if picked[index] else (part_cost if taken_any else 0)
                cost = count(sentence.text) + joint
                if overlap[best] >= duplicate:
                    continue
                if used + cost > budget:
                    bound = True
                    continue
                picked[index].append(sentence)
                for other, matrix in enumerate(vectors):
                    if matrix is not None:
                        np.maximum(overlaps[other], matrix @ sentence.vector, out=overlaps[other])
                taken_any = True
                used += cost
                progress = True
                break
    return Picked(picked, bound)
