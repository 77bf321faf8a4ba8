"""The pieces clustered context stands on: k-means clustering with silhouette choice,
sentence splitting, token fitting and tokenizer choice."""

from __future__ import annotations

import numpy as np
import pytest

from memlayer import InvalidInputError
from memlayer.chunking import count_tokens, split_sentences
from memlayer.retrievers.clusters import cluster
from memlayer.tokens import fit_tokens, resolve_tokenizer


def _planted(k: int, per: int, dim: int = 32, spread: float = 0.15, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    rows = np.repeat(centres, per, axis=0) + spread * rng.standard_normal((k * per, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _silhouette(vectors: np.ndarray, labels: np.ndarray) -> float:
    distance = 1 - vectors @ vectors.T
    scores = []
    for i, own in enumerate(labels):
        mine = labels == own
        if mine.sum() == 1:
            scores.append(0.0)
            continue
        inside = distance[i, mine].sum() / (mine.sum() - 1)
        nearest = min(distance[i, labels == c].mean() for c in set(labels) if c != own)
        scores.append((nearest - inside) / max(inside, nearest))
    return float(np.mean(scores))


@pytest.mark.parametrize("k", [3, 6, 12])
def test_cluster_finds_planted_clusters(k: int) -> None:
    vectors = _planted(k, 20)
    found = cluster(vectors, 32)
    assert found.k == k
    truth = np.repeat(np.arange(k), 20)
    for label in range(found.k):  # each found cluster is one planted cluster
        assert len(set(truth[found.labels == label])) == 1
    assert found.silhouette == pytest.approx(_silhouette(vectors, found.labels), abs=1e-4)
    assert np.allclose(np.linalg.norm(found.centroids, axis=1), 1, atol=1e-5)


def test_cluster_respects_the_limit_and_is_deterministic() -> None:
    vectors = _planted(12, 10)
    first = cluster(vectors, 4)
    assert 2 <= first.k <= 4
    again = cluster(vectors, 4)
    assert np.array_equal(first.labels, again.labels)
    assert sorted(set(first.labels.tolist())) == list(range(first.k))


def test_cluster_of_too_few_vectors_is_one_cluster() -> None:
    vectors = _planted(2, 1)
    assert cluster(vectors, 8).k == 1
    assert cluster(_planted(4, 10), 1).k == 1


def test_split_sentences() -> None:
    text = 'Battery lasts 30 hours. Shipping was slow!  Great "value." Would buy\nagain'
    assert split_sentences(text) == [
        "Battery lasts 30 hours.",
        "Shipping was slow!",
        'Great "value."',
        "Would buy",
        "again",
    ]
    assert split_sentences("no end mark") == ["no end mark"]
    assert split_sentences("  ") == []


def test_fit_tokens_keeps_the_longest_prefix_that_fits() -> None:
    def chars(text: str) -> int:
        return len(text)

    text = "one two three four"
    assert fit_tokens(text, 100, chars) == text
    assert fit_tokens(text, 13, chars) == "one two three"
    assert fit_tokens(text, 12, chars) == "one two"
    assert fit_tokens(text, 2, chars) == ""
    assert fit_tokens(text, 2, count_tokens) == "one two"


class _HFLike:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * (len(text.split()) + (2 if add_special_tokens else 0))


def test_a_tokenizer_counts_each_text_once_across_calls() -> None:
    """Repeated contexts over the same memories do not tokenize them again."""
    seen: list[str] = []

    class Counting:
        def encode(self, text: str) -> list[int]:
            seen.append(text)
            return [0] * len(text.split())

    tokenizer, embedder = Counting(), object()
    first = resolve_tokenizer(tokenizer, embedder)
    assert resolve_tokenizer(tokenizer, embedder) is first
    assert [first("a b"), first("a b"), resolve_tokenizer(tokenizer, embedder)("a b")] == [2] * 3
    assert seen == ["a b"]
    assert resolve_tokenizer(Counting(), embedder) is not first  # another tokenizer


def test_resolve_tokenizer() -> None:
    class NoCounter:
        pass

    assert resolve_tokenizer(None, NoCounter()) is count_tokens
    assert resolve_tokenizer("words", NoCounter()) is count_tokens
    assert resolve_tokenizer(_HFLike(), NoCounter())("a b c") == 3  # no special tokens
    assert resolve_tokenizer(len, NoCounter())("abc") == 3
    with pytest.raises(InvalidInputError) as info:
        resolve_tokenizer("gpt", NoCounter())
    assert info.value.field == "tokenizer"
