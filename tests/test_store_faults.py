"""The page store under real faults: SIGKILL mid-write, a full disk, and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from crash import kill_after_acks

from memlayer.errors import StorageError
from memlayer.stores import DiskTier, PageStore, SQLTier
from memlayer.types import Page

WRITER = """
import sys, torch
from memlayer.stores import PageStore
from memlayer.types import Page
store = PageStore.open(ram_budget="64KiB", path=sys.argv[1], segment_bytes="256KiB")
i = 0
while True:
    g = torch.Generator().manual_seed(i)
    store.put(Page(id=f"p{i}", payload={"k": torch.randn(4, 64, 16, generator=g).bfloat16()}))
    print(i, flush=True)
    i += 1
"""


def expected(i: int) -> torch.Tensor:
    return torch.randn(4, 64, 16, generator=torch.Generator().manual_seed(i)).bfloat16()


def test_sigkill_loses_no_acknowledged_page(tmp_path: Path) -> None:
    acknowledged = kill_after_acks(WRITER, str(tmp_path / "store"), at_least=60, timeout_s=120)
    with PageStore.open(ram_budget="64KiB", path=tmp_path / "store") as store:
        assert store.tiers[-1].stats()["segments"] > 1
        assert store.tiers[-1].stats()["corrupt"] == 0
        ids = store.ids()
        assert {f"p{i}" for i in range(acknowledged + 1)} <= ids
        for i in range(acknowledged + 1):
            assert torch.equal(store.get(f"p{i}")[0].payload["k"], expected(i))
        store.put(Page(id="after", payload=b"reopened cleanly"))


FULL_DISK = """
import resource, signal, sys
from memlayer.errors import StorageError
from memlayer.stores import DiskTier
from memlayer.types import Page
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
tier = DiskTier(sys.argv[1])
tier.put(Page(id="small", payload=b"x" * 1000))
resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))
try:
    tier.put(Page(id="big", payload=b"y" * 20000))
except StorageError as exc:
    print("refused:", exc)
tier.put(Page(id="fits", payload=b"z" * 1000))
print("ok")
"""


def test_full_disk_is_a_clear_error_and_damages_nothing(tmp_path: Path) -> None:
    """A real write failure (file size limit: EFBIG, as a full disk gives ENOSPC)."""
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "refused: disk full writing page 'big'" in result.stdout
    tier = DiskTier(tmp_path / "d")
    assert set(tier.ids()) == {"small", "fits"}
    assert tier.get("fits").payload == b"z" * 1000
    assert tier.stats()["corrupt"] == 0
    tier.close()


def test_storage_error_is_an_oserror_a_caller_can_catch() -> None:
    assert issubclass(StorageError, OSError)


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("psycopg")
    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    yield url
    server.cleanup()


@pytest.mark.postgres
def test_sql_tier_on_real_postgresql(postgres_url: str) -> None:
    pages = [
        Page(id=f"p{i}", payload={"k": torch.randn(3, 8).bfloat16(), "n": torch.arange(i + 1)})
        for i in range(10)
    ]
    tier = SQLTier(postgres_url, table="pages_test")
    tier.put_many(pages)
    tier.put(pages[0])  # upsert
    assert len(tier) == 10 and tier.nbytes > 0
    other = SQLTier(postgres_url, table="pages_test")  # a second worker sees the same pages
    for page in pages:
        got = other.get(page.id)
        assert isinstance(got.payload, dict)
        assert torch.equal(got.payload["k"].view(torch.int16), page.payload["k"].view(torch.int16))
        assert torch.equal(got.payload["n"], page.payload["n"])
    other.evict("p3")
    assert "p3" not in tier
    with PageStore.open(ram_budget="1KiB", url=postgres_url) as store:
        store.put(Page(id="via-store", payload=b"shared"))
        assert store.get("via-store")[0].payload == b"shared"
    tier.close()
    other.close()
