"""Chunk text streams into overlapping token windows without holding the whole stream.

Tokens are words and punctuation marks (a close, fast proxy for model tokens); chunks keep
the original text between their first and last token, so formatting survives.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from memlayer.errors import InvalidInputError

TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# a sentence ends at . ! ? or … (with closing quotes/brackets) before whitespace, or at a line break
SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|(?<=[.!?…][\"')\]])\s+|\n+")


def count_tokens(text: str) -> int:
    """Number of tokens in `text` under memlayer's tokenizer."""
    return sum(1 for _ in TOKEN.finditer(text))


def truncate_tokens(text: str, max_tokens: int) -> str:
    """The longest prefix of `text` holding at most `max_tokens` tokens."""
    if max_tokens <= 0:
        return ""
    end = 0
    for index, match in enumerate(TOKEN.finditer(text)):
        if index == max_tokens:
            break
        end = match.end()
    return text[:end]


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, stripped, in order (a text without an end mark is one)."""
    return [piece.strip() for piece in SENTENCE_END.split(text) if piece and piece.strip()]


def chunk_stream(
    stream: Iterable[str], *, chunk_tokens: int = 200, overlap: int = 40
) -> Iterator[str]:
    """Yield chunks of `chunk_tokens` tokens, consecutive chunks sharing `overlap` tokens.

    Memory is bounded by one chunk plus one incoming piece, whatever the stream's length.
    """
    if chunk_tokens < 1:
        raise InvalidInputError("chunk_tokens", "must be at least 1", chunk_tokens)
    if not 0 <= overlap < chunk_tokens:
        raise InvalidInputError("overlap", "must be in [0, chunk_tokens)", overlap)
    step = chunk_tokens - overlap
    buffer, start = "", 0
    for piece in stream:
        if not isinstance(piece, str):
            raise InvalidInputError("stream", "must yield strings", type(piece).__name__)
        buffer = buffer[start:] + piece
        start = 0
        while True:
            spans = _first_spans(buffer, start, chunk_tokens + 1)
            if len(spans) <= chunk_tokens:
                break  # the last token may continue in the next piece
            yield buffer[spans[0][0] : spans[chunk_tokens - 1][1]]
            start = spans[step][0]
    spans = _first_spans(buffer, start, chunk_tokens + 1)
    if spans:
        yield buffer[spans[0][0] : spans[-1][1]]


def _first_spans(text: str, start: int, limit: int) -> list[tuple[int, int]]:
    spans = []
    for match in TOKEN.finditer(text, start):
        spans.append(match.span())
        if len(spans) == limit:
            break
    return spans
