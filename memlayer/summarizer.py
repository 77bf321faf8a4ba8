"""Abstractive cluster summaries: a user's `Summarizer` (any callable, an LLM included),
its output checked and fitted to the token allowance, cached by cluster content.

The cache key is the cluster's texts and the allowance, never the query, so every query that
meets the same cluster reuses its summary and repeated queries call the summarizer no more.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from memlayer.errors import InvalidInputError
from memlayer.tokens import Tokenizer, fit_tokens

Summarizer = Callable[[Sequence[str], int], str]
"""`summarizer(texts, max_tokens) -> summary`: the cluster's texts, most central first, and
the tokens its summary may use (a longer answer is cut at a word boundary)."""


class SummaryCache:
    """Summaries of `summarizer`, computed once per (cluster texts, allowance), LRU-bounded."""

    def __init__(self, summarizer: Summarizer, size: int = 1024) -> None:
        if not callable(summarizer):
            raise InvalidInputError("summarizer", "must be callable (texts, max_tokens) -> str")
        self.summarizer = summarizer
        self.size = size
        self.calls = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, str] = OrderedDict()

    def summary(self, texts: Sequence[str], max_tokens: int, count: Tokenizer) -> str:
        """The summary of `texts` in at most `max_tokens` tokens under `count`; a summarizer
        answer that is not a non-empty string raises InvalidInputError and is not cached."""
        key = _key(texts, max_tokens)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
        if cached is None:
            self.calls += 1
            cached = _checked(self.summarizer(list(texts), max_tokens))
            with self._lock:
                self._entries[key] = cached
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        fitted = fit_tokens(cached, max_tokens, count)
        if not fitted:
            raise InvalidInputError(
                "summarizer", f"must return a summary whose first word fits {max_tokens} tokens"
            )
        return fitted


def _checked(output: object) -> str:
    if not isinstance(output, str) or not output.strip():
        raise InvalidInputError("summarizer", "must return a non-empty string", output)
    return output.strip()


def _key(texts: Sequence[str], max_tokens: int) -> bytes:
    digest = hashlib.blake2b(str(max_tokens).encode(), digest_size=16)
    for text in texts:
        digest.update(b"\x1f" + text.encode())
    return digest.digest()
