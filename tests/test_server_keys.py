"""The API key cache: a worker trusts a key it looked up for `key_cache_s` seconds, a
revocation takes effect at once in the worker that made it and within `key_cache_s` in every
other worker (two apps over one database stand for two workers)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from server_process import ADMIN, ADMIN_HEADERS, new_tenant

from memlayer import Memory
from memlayer.integrations.server import ServerSettings, create_app
from memlayer.integrations.server.auth import KeyCache
from memlayer.integrations.server.tenants import Caller


def test_cache_keeps_found_keys_for_the_ttl_only() -> None:
    cache = KeyCache(ttl_s=60, max_keys=2)
    ada = Caller("t", "k1")
    cache.put("h1", ada, time.monotonic(), cache.generation)
    assert cache.get("h1") == ada
    cache.put("h0", Caller("t", "k0"), time.monotonic() - 61, cache.generation)
    assert cache.get("h0") is None  # looked up longer ago than the ttl
    for n in range(2, 5):
        cache.put(f"h{n}", Caller("t", f"k{n}"), time.monotonic(), cache.generation)
    assert cache.get("h1") is None and cache.get("h4") is not None  # at most max_keys
    assert KeyCache(ttl_s=0).get("h1") is None


def test_a_revocation_voids_lookups_under_way() -> None:
    cache = KeyCache(ttl_s=60)
    began = cache.generation, time.monotonic()  # a lookup reads the key as valid ...
    cache.put("h1", Caller("t", "k1"), time.monotonic(), cache.generation)
    cache.forget("k1")  # ... the key is revoked here meanwhile ...
    cache.put("h1", Caller("t", "k1"), began[1], began[0])  # ... and its answer comes in
    assert cache.get("h1") is None


def test_revocation_is_seen_at_once_here_and_within_the_ttl_elsewhere(tmp_path: Path) -> None:
    settings = ServerSettings(admin_token=ADMIN, rate_per_s=0, key_cache_s=1.0)
    here = Memory(path=tmp_path, embedder="hash")
    there = Memory(path=tmp_path, embedder="hash")
    with (
        TestClient(create_app(here, settings, close_memory=True)) as one,
        TestClient(create_app(there, settings, close_memory=True)) as other,
    ):
        tenant, key = new_tenant(one)
        assert one.get("/v1/me", headers=key).status_code == 200
        assert other.get("/v1/me", headers=key).status_code == 200  # now cached there too
        cached_by = time.monotonic()  # the cached entry expires by cached_by + ttl
        key_id = one.get("/v1/me", headers=key).json()["key_id"]
        one.delete(f"/v1/tenants/{tenant}/keys/{key_id}", headers=ADMIN_HEADERS)
        assert one.get("/v1/me", headers=key).status_code == 401
        while True:  # a request that starts after the expiry looks the key up again
            started = time.monotonic()
            if other.get("/v1/me", headers=key).status_code != 200:
                break
            assert started < cached_by + 1.0, "the other worker kept the key past its ttl"
            time.sleep(0.05)
        assert other.post("/v1/search", json={"query": "x"}, headers=key).status_code == 401


def test_no_cache_looks_every_key_up(tmp_path: Path) -> None:
    settings = ServerSettings(admin_token=ADMIN, rate_per_s=0, key_cache_s=0)
    with (
        TestClient(
            create_app(Memory(path=tmp_path, embedder="hash"), settings, close_memory=True)
        ) as one,
        TestClient(
            create_app(Memory(path=tmp_path, embedder="hash"), settings, close_memory=True)
        ) as other,
    ):
        tenant, key = new_tenant(one)
        assert other.get("/v1/me", headers=key).status_code == 200
        key_id = other.get("/v1/me", headers=key).json()["key_id"]
        one.delete(f"/v1/tenants/{tenant}/keys/{key_id}", headers=ADMIN_HEADERS)
        assert other.get("/v1/me", headers=key).status_code == 401
