"""Context strategies: turn ranked hits into one prompt string within a token budget.

A strategy is a small class registered by name in `STRATEGIES`; `Memory.context(strategy=...)`
picks one. `ranked` (the only one today) packs hits best-first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from memlayer.chunking import count_tokens, truncate_tokens
from memlayer.registry import Registry
from memlayer.types import Hit

SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Context:
    """A packed prompt context and the ids of the records it quotes, in order."""

    text: str
    ids: list[str]
    tokens: int


class ContextStrategy(Protocol):
    """Packs hits into a context of at most `budget_tokens` tokens."""

    def pack(self, hits: Sequence[Hit], budget_tokens: int) -> Context: ...


STRATEGIES: Registry[ContextStrategy] = Registry("strategy")


@STRATEGIES.register("ranked")
class RankedContext:
    """Best hits first, each labelled with its id; the last one is cut to fit the budget."""

    def pack(self, hits: Sequence[Hit], budget_tokens: int) -> Context:
        parts: list[str] = []
        ids: list[str] = []
        used = 0
        for hit in hits:
            label = f"[{hit.id}] "
            cost = count_tokens(label) + count_tokens(hit.text) + (1 if parts else 0)
            room = budget_tokens - used
            if cost > room:
                text = truncate_tokens(hit.text, room - count_tokens(label) - (1 if parts else 0))
                if text:
                    parts.append(label + text)
                    ids.append(hit.id)
                break
            parts.append(label + hit.text)
            ids.append(hit.id)
            used += cost
        text = SEPARATOR.join(parts)
        return Context(text=text, ids=ids, tokens=count_tokens(text))
