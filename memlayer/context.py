"""Context strategies: turn ranked hits into one prompt string within a token budget.

A strategy is a small class registered by name; `ranked` packs hits best-first. Clustered
packing (CRAG) plugs in here as another strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memlayer.chunking import count_tokens, truncate_tokens
from memlayer.errors import InvalidInputError
from memlayer.types import Hit

SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Context:
    """A packed prompt context and the ids of the records it quotes, in order."""

    text: str
    ids: list[str]
    tokens: int


class ContextStrategy:
    """Packs hits into a context of at most `budget_tokens` tokens."""

    name = "base"

    def pack(self, hits: Sequence[Hit], budget_tokens: int) -> Context:
        raise NotImplementedError


class RankedContext(ContextStrategy):
    """Best hits first, each labelled with its id; the last one is cut to fit the budget."""

    name = "ranked"

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


STRATEGIES: dict[str, Callable[[], ContextStrategy]] = {RankedContext.name: RankedContext}


def get_strategy(name: str) -> ContextStrategy:
    """The strategy registered under `name`."""
    factory = STRATEGIES.get(name)
    if factory is None:
        raise InvalidInputError("strategy", f"must be one of {sorted(STRATEGIES)}", name)
    return factory()
