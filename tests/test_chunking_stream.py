"""Chunking: windows of exactly N tokens with the promised overlap, across piece boundaries."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memlayer import InvalidInputError
from memlayer.chunking import TOKEN, chunk_stream, count_tokens, truncate_tokens

WORDS = st.lists(st.sampled_from(["alpha", "beta", "x", "1234", ".", ",", "über"]), max_size=300)


@given(
    words=WORDS,
    cuts=st.lists(st.integers(0, 2000), max_size=8),
    size=st.integers(1, 40),
    overlap_frac=st.floats(0, 0.9),
)
def test_chunks_cover_the_stream_with_overlap(words, cuts, size, overlap_frac) -> None:
    overlap = min(int(size * overlap_frac), size - 1)
    text = " ".join(words)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    chunks = list(chunk_stream(pieces, chunk_tokens=size, overlap=overlap))
    tokens = TOKEN.findall(text)
    if not tokens:
        assert chunks == []
        return
    step = size - overlap
    rebuilt = TOKEN.findall(chunks[0])
    for chunk in chunks[1:]:
        part = TOKEN.findall(chunk)
        assert part[:overlap] == rebuilt[len(rebuilt) - overlap :] if overlap else True
        rebuilt += part[overlap:]
    assert rebuilt == tokens
    assert all(count_tokens(c) == size for c in chunks[:-1])
    assert len(chunks) == max(1, -(-(len(tokens) - overlap) // step))


def test_truncate_keeps_a_prefix() -> None:
    assert truncate_tokens("one, two three", 2) == "one,"
    assert truncate_tokens("one two", 0) == ""


@pytest.mark.parametrize(("size", "overlap", "field"), [(0, 0, "chunk_tokens"), (5, 5, "overlap")])
def test_bad_sizes(size: int, overlap: int, field: str) -> None:
    with pytest.raises(InvalidInputError, match=field):
        list(chunk_stream(["text"], chunk_tokens=size, overlap=overlap))


def test_non_string_piece_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="stream"):
        list(chunk_stream([b"bytes"]))  # type: ignore[list-item]
