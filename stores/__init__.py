"""memlayer.stores: tiers (GPU, RAM, disk, SQL) and the PageStore that moves pages between them.

Knows bytes, tensors and budgets, never models or queries. Imports only the ground; the
tier classes load torch and SQLAlchemy on first use, so `import memlayer.stores` is cheap.
Tier kinds are registered by name in `TIERS`; `build_tiers` makes a store's tiers from a
`StoreConfig`.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "TIERS": "factory",
    "DiskTier": "disk_tier",
    "PageStore": "page_store",
    "PromotionStep": "tier",
    "SQLTier": "sql_tier",
    "StoreConfig": "factory",
    "TensorTier": "tensor_tier",
    "Tier": "tier",
    "TierConfig": "factory",
    "build_tiers": "factory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'memlayer.stores' has no attribute {name!r}")
    return getattr(import_module(f"memlayer.stores.{_EXPORTS[name]}"), name)
