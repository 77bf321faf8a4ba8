"""memlayer.stores: tiers (GPU, RAM, disk, SQL) and the PageStore that moves pages between them.

Knows bytes, tensors and budgets, never models or queries. Imports only the ground; the
tier classes load torch and SQLAlchemy on first use, so `import memlayer.stores` is cheap.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DiskTier": "disk_tier",
    "PageStore": "page_store",
    "SQLTier": "sql_tier",
    "StoreConfig": "page_store",
    "TensorTier": "tensor_tier",
    "Tier": "tier",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'memlayer.stores' has no attribute {name!r}")
    return getattr(import_module(f"memlayer.stores.{_EXPORTS[name]}"), name)
