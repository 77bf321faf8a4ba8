"""memlayer.kvretrieval: KV memory inside HF models: the cache and its layers, the attention
hook, page selectors (`PageSelector`, the `SELECTORS` registry; `squeezed` registers itself
on import here), rotary placement, the SmolLM2 loader and the passkey task."""

from memlayer.kvretrieval import retrolm  # noqa: F401  (registers "retrolm")
from memlayer.kvretrieval import squeezed as _squeezed  # noqa: F401  (registers "squeezed")
from memlayer.kvretrieval.selectors import SELECTORS, PageSelector

__all__ = ["SELECTORS", "PageSelector"]
