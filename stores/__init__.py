"""memlayer.stores: tiers (GPU, RAM, disk, SQL) and the PageStore that moves pages between them.

Knows bytes, tensors and budgets, never models or queries. Imports only the ground.
"""

from memlayer.stores.disk_tier import DiskTier
from memlayer.stores.page_store import PageStore, StoreConfig
from memlayer.stores.sql_tier import SQLTier
from memlayer.stores.tensor_tier import TensorTier
from memlayer.stores.tier import Tier

__all__ = ["DiskTier", "PageStore", "SQLTier", "StoreConfig", "TensorTier", "Tier"]
