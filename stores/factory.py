"""Tiers by name: the registry of tier kinds, the pydantic config of a store's tiers, and
`build_tiers`, the one factory that turns that config into tier objects.

`PageStore.open` and the KV memory both build their tiers here. A tier kind is a `Tier`
class registered in `TIERS` under a name, through its `from_options`; a `TierConfig` names
the kind, and its other fields are the keyword arguments of the class. A new tier is one
class and one line: `TIERS.register("kind")(NewTier.from_options)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from memlayer.config import ByteSize
from memlayer.errors import InvalidInputError
from memlayer.registry import Registry
from memlayer.stores.disk_tier import DiskTier
from memlayer.stores.sql_tier import SQLTier
from memlayer.stores.tensor_tier import TensorTier
from memlayer.stores.tier import Tier

TIERS: Registry[Tier] = Registry("kind")
TIERS.register("tensor")(TensorTier.from_options)
TIERS.register("disk")(DiskTier.from_options)
TIERS.register("sql")(SQLTier.from_options)


class TierConfig(BaseModel):
    """One tier: its registered `kind`, its `name` in the store (the class's default when
    None), its byte `budget` (units accepted; None: unbounded) and, as further fields, the
    keyword arguments of its class (`device`, `path`, `url`, `policy`, `sync`, ...)."""

    model_config = ConfigDict(extra="allow")

    kind: str
    name: str | None = None
    budget: ByteSize | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments the kind's class is called with."""
        named = {"name": self.name} if self.name is not None else {}
        return {**named, "budget": self.budget, **(self.model_extra or {})}


class StoreConfig(BaseModel):
    """Which tiers a store has, front to back. Budgets accept units: "8GiB", "512MB".

    Either `tiers`, a list of `TierConfig`, or the shorthand fields: a GPU tier when
    `gpu_budget` is set, a RAM tier when `ram_budget` is set or nothing durable is named,
    a disk tier at `path`, an SQL tier at `url`.
    """

    model_config = ConfigDict(extra="forbid")

    gpu_budget: ByteSize | None = None
    gpu_device: str = "cuda"
    ram_budget: ByteSize | None = None
    path: Path | None = None
    url: str | None = None
    policy: Literal["lru", "lfu"] = "lru"
    segment_bytes: ByteSize = 256 * 2**20
    sync: bool = True
    tiers: list[TierConfig] | None = None

    @model_validator(mode="after")
    def _tiers_or_shorthand(self) -> StoreConfig:
        given = sorted(self.model_fields_set - {"tiers"})
        if self.tiers is not None and given:
            shorthand = ", ".join(given)
            raise ValueError(f"give either tiers or the shorthand fields, not both ({shorthand})")
        return self

    def tier_configs(self) -> list[TierConfig]:
        """The tiers this config names, front (fastest) to back (durable)."""
        if self.tiers is not None:
            return list(self.tiers)
        tensor = {"kind": "tensor", "policy": self.policy}
        tiers: list[dict[str, Any]] = []
        if self.gpu_budget is not None:
            tiers.append(
                {**tensor, "name": "gpu", "device": self.gpu_device, "budget": self.gpu_budget}
            )
        if self.ram_budget is not None or (self.path is None and self.url is None):
            tiers.append({**tensor, "name": "ram", "device": "cpu", "budget": self.ram_budget})
        if self.path is not None:
            disk = {"path": self.path, "segment_bytes": self.segment_bytes, "sync": self.sync}
            tiers.append({"kind": "disk", **disk})
        if self.url is not None:
            tiers.append({"kind": "sql", "url": self.url})
        return [TierConfig.model_validate(tier) for tier in tiers]


def build_tiers(config: StoreConfig) -> list[Tier]:
    """The configured tiers, front to back; the ones already opened are closed again when
    a later one fails."""
    tiers: list[Tier] = []
    try:
        for index, tier_config in enumerate(config.tier_configs()):
            tiers.append(_build_tier(tier_config, index))
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    return tiers


def _build_tier(config: TierConfig, index: int) -> Tier:
    """One tier of kind `config.kind`; an option its class does not take is an
    InvalidInputError naming `tiers.<index>`."""
    try:
        return TIERS.create(config.kind, options=config.options)
    except TypeError as exc:
        rule = f"options of kind {config.kind!r}: {exc}"
        raise InvalidInputError(f"tiers.{index}", rule) from exc
