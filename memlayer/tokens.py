"""Tokenizers that count a context's tokens: the embedder's own, memlayer's word tokenizer, or
one the user names (a Hugging Face tokenizer or any `str -> int` callable).

A context budget is only meaningful in the tokens of some model; `Memory.context` counts with
the embedder's tokenizer unless told otherwise, and every strategy counts with the same one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

from memlayer.chunking import TOKEN, count_tokens
from memlayer.errors import InvalidInputError

Tokenizer = Callable[[str], int]

# one remembering counter per tokenizer (or per embedder, for its own), while it is alive
_COUNTERS: weakref.WeakKeyDictionary[Any, Tokenizer] = weakref.WeakKeyDictionary()
_REMEMBERED = 50_000  # texts whose counts a counter keeps (the most recently counted)


def resolve_tokenizer(spec: Any, embedder: object) -> Tokenizer:
    """Turn a user's choice into a token counter: None (the embedder's tokenizer, or the word
    tokenizer when the embedder has none), "words", an object with `encode` (a Hugging Face
    or tiktoken tokenizer: the length of its encoding, without special tokens), or a callable
    returning a count.

    The counter remembers the counts of recent texts, and one tokenizer gets the same
    counter on every call, so repeated contexts over the same memories (a CRAG pack counts
    hundreds of sentences) do not tokenize them again. A tokenizer must count a text the
    same way every time."""
    owner = embedder if spec is None else spec
    try:
        return _COUNTERS[owner]
    except (KeyError, TypeError):  # TypeError: not weakly referable (a str, a builtin)
        pass
    counter = _counter(spec, embedder)
    if counter is count_tokens:  # a regular expression: cheaper than remembering
        return counter
    counter = functools.lru_cache(maxsize=_REMEMBERED)(counter)
    with contextlib.suppress(TypeError):
        _COUNTERS[owner] = counter
    return counter


def _counter(spec: Any, embedder: object) -> Tokenizer:
    """The token counter `spec` names (see `resolve_tokenizer`)."""
    if spec is None:
        own = getattr(embedder, "count_tokens", None)
        return own if callable(own) else count_tokens
    if spec == "words":
        return count_tokens
    if isinstance(spec, str):
        raise InvalidInputError(
            "tokenizer", "must be None, 'words', a tokenizer or a callable", spec
        )
    encode = getattr(spec, "encode", None)
    if callable(encode):
        if "add_special_tokens" in _parameters(encode):
            return _checked(lambda text: len(encode(text, add_special_tokens=False)))
        return _checked(lambda text: len(encode(text)))
    if callable(spec):
        return _checked(spec)
    raise InvalidInputError(
        "tokenizer",
        "must be None, 'words', a tokenizer with encode() or a str -> int callable",
        spec,
    )


def fit_tokens(text: str, max_tokens: int, count: Tokenizer) -> str:
    """The longest prefix of `text`, cut at a word or punctuation boundary, that `count`
    finds at most `max_tokens` tokens long ("" when not even one word fits)."""
    if max_tokens <= 0:
        return ""
    if count(text) <= max_tokens:
        return text
    ends = [match.end() for match in TOKEN.finditer(text)]
    low, high = 0, len(ends)  # ends[:low] fit; ends[high:] are known not to
    while low < high:
        middle = (low + high + 1) // 2
        if count(text[: ends[middle - 1]]) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return text[: ends[low - 1]] if low else ""


def _checked(fn: Callable[[str], Any]) -> Tokenizer:
    """A user counter whose every answer is checked to be a non-negative int."""

    def count(text: str) -> int:
        value = fn(text)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError("tokenizer", "must return a token count (an int >= 0)", value)
        return value

    return count


def _parameters(fn: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()
