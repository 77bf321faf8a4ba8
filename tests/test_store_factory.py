"""One factory for every store's tiers: `StoreConfig`'s shorthand fields and its explicit
`tiers` list both go through `build_tiers`, and so does the KV memory's store
(`open_kv_store`), whose layout and budget rules are checked here tier by tier."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from memlayer.errors import InvalidInputError
from memlayer.kvretrieval.config import KVConfig
from memlayer.kvretrieval.sealed_pages import open_kv_store
from memlayer.stores import DiskTier, PageStore, SQLTier, StoreConfig, TensorTier, build_tiers
from memlayer.stores.policy import LFU, LRU


def layout(tiers: list[Any]) -> list[tuple[str, str, Any]]:
    """(class, name, budget) of each tier, front to back."""
    return [(type(tier).__name__, tier.name, tier.budget) for tier in tiers]


def test_the_shorthand_fields_build_the_tiers_they_always_did(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    cases: list[tuple[dict[str, Any], list[tuple[str, str, Any]]]] = [
        ({}, [("TensorTier", "ram", None)]),
        ({"path": tmp_path / "a"}, [("DiskTier", "disk", None)]),
        ({"url": url}, [("SQLTier", "sql", None)]),
        (
            {"ram_budget": "1MiB", "path": tmp_path / "b"},
            [("TensorTier", "ram", 2**20), ("DiskTier", "disk", None)],
        ),
        (
            {"gpu_budget": "2KiB", "gpu_device": "cpu", "path": tmp_path / "c", "url": url},
            [("TensorTier", "gpu", 2048), ("DiskTier", "disk", None), ("SQLTier", "sql", None)],
        ),
        (
            {"gpu_budget": 4096, "gpu_device": "cpu", "ram_budget": "8KiB"},
            [("TensorTier", "gpu", 4096), ("TensorTier", "ram", 8192)],
        ),
    ]
    for fields, expected in cases:
        tiers = build_tiers(StoreConfig(**fields))
        assert layout(tiers) == expected, fields
        for tier in tiers:
            tier.close()
    gpu, ram, disk = build_tiers(
        StoreConfig(
            gpu_budget="4KiB",
            gpu_device="cpu",
            ram_budget="8KiB",
            path=tmp_path / "d",
            policy="lfu",
            segment_bytes="64KiB",
            sync=False,
        )
    )
    assert isinstance(gpu, TensorTier) and isinstance(ram, TensorTier)
    assert gpu.device == torch.device("cpu") and isinstance(gpu.policy, LFU)
    assert isinstance(ram.policy, LFU)
    assert isinstance(disk, DiskTier) and disk.segment_bytes == 2**16 and disk.sync is False
    assert disk.path == tmp_path / "d"
    disk.close()


def test_an_explicit_tier_list_goes_through_the_registry(tmp_path: Path) -> None:
    tiers: list[dict[str, Any]] = [
        {"kind": "tensor", "name": "hot", "device": "cpu", "budget": "16KiB"},
        {"kind": "disk", "name": "cold", "path": tmp_path / "d", "segment_bytes": 2**16},
        {"kind": "sql", "url": f"sqlite:///{tmp_path / 'p.db'}", "table": "extra"},
    ]
    with PageStore.open(tiers=tiers) as store:
        assert layout(store.tiers) == [
            ("TensorTier", "hot", 2**14),
            ("DiskTier", "cold", None),
            ("SQLTier", "sql", None),
        ]
        hot = store.tiers[0]
        assert isinstance(hot, TensorTier) and isinstance(hot.policy, LRU)


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    unknown = r"kind: must be one of (.*, )?disk, (.*, )?sql, tensor.*'floppy'"  # the registry's
    with pytest.raises(InvalidInputError, match=unknown):
        PageStore.open(tiers=[{"kind": "floppy"}])
    with pytest.raises(InvalidInputError, match=r"tiers\.0: options of kind 'tensor'.*colour"):
        PageStore.open(tiers=[{"kind": "tensor", "name": "ram", "device": "cpu", "colour": 1}])
    with pytest.raises(InvalidInputError, match=r"tiers.0.budget"):
        PageStore.open(tiers=[{"kind": "tensor", "budget": "lots"}])
    with pytest.raises(InvalidInputError, match=r"tiers.0.kind"):
        PageStore.open(tiers=[{"name": "ram"}])
    with pytest.raises(InvalidInputError, match=r"either tiers or the shorthand.*ram_budget"):
        PageStore.open(tiers=[{"kind": "disk", "path": tmp_path}], ram_budget="1MiB")


def test_a_failed_build_closes_the_tiers_it_opened(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(InvalidInputError, match="kind"):
        build_tiers(StoreConfig(tiers=[{"kind": "disk", "path": tmp_path}, {"kind": "nope"}]))
    assert len(os.listdir("/proc/self/fd")) == before


PAGE, STEP = 1000, 4  # bytes of one KV page, pages one step gathers


def kv_store(device: str, **fields: Any) -> tuple[PageStore, Any]:
    return open_kv_store(KVConfig.build(**fields), torch.device(device), PAGE, STEP)


def test_the_kv_store_layout(tmp_path: Path) -> None:
    store, owned = kv_store("cpu")
    assert layout(store.tiers) == [("TensorTier", "ram", None)] and owned is None
    store.close()

    store, owned = kv_store("cpu", ram_budget=PAGE * STEP)
    assert layout(store.tiers) == [("TensorTier", "ram", PAGE * STEP), ("DiskTier", "disk", None)]
    disk = store.tiers[1]
    assert isinstance(disk, DiskTier) and disk.sync is False
    assert owned is not None and disk.path == Path(owned.name) and disk.path.is_dir()
    store.close()
    owned.cleanup()

    store, owned = kv_store("cpu", offload_path=tmp_path / "off")
    assert layout(store.tiers) == [("TensorTier", "ram", None), ("DiskTier", "disk", None)]
    disk = store.tiers[1]
    assert isinstance(disk, DiskTier) and disk.path == tmp_path / "off" and disk.sync is False
    assert owned is None
    store.close()

    # a model on a GPU gets a front tier on its device, bounded or not (no CUDA needed to
    # build one: tensor tiers allocate on first put)
    for budget in (None, PAGE * STEP * 2):
        store, owned = kv_store("cuda:0", gpu_budget=budget, ram_budget=PAGE * STEP)
        assert layout(store.tiers) == [
            ("TensorTier", "gpu", budget),
            ("TensorTier", "ram", PAGE * STEP),
            ("DiskTier", "disk", None),
        ]
        gpu = store.tiers[0]
        assert isinstance(gpu, TensorTier) and gpu.device == torch.device("cuda:0")
        store.close()
        assert owned is not None
        owned.cleanup()


def test_the_kv_store_refuses_budgets_it_cannot_use() -> None:
    with pytest.raises(InvalidInputError, match="gpu_budget: needs a model on a CUDA device"):
        kv_store("cpu", gpu_budget=10 * PAGE * STEP)
    for field in ("gpu_budget", "ram_budget"):
        with pytest.raises(InvalidInputError, match=rf"{field}: must hold the {STEP} pages"):
            kv_store("cuda", **{field: PAGE * STEP - 1})


def test_sql_and_disk_tiers_take_a_name(tmp_path: Path) -> None:
    sql = SQLTier(f"sqlite:///{tmp_path / 'p.db'}", name="shared")
    disk = DiskTier(tmp_path / "d", name="local")
    assert (sql.name, disk.name) == ("shared", "local")
    sql.close()
    disk.close()
