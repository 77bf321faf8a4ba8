"""Real `memlayer serve` processes: a server SIGKILLed in the middle of a write burst loses
no acknowledged write (SQLite and PostgreSQL, two workers), and two servers on one
PostgreSQL see each other's writes, tenants and revocations at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx
from server_process import ADMIN_HEADERS, db_argument, kill, new_tenant, serve, start


async def _burst(
    url: str, key: dict[str, str], acknowledged: list[str], stop: asyncio.Event, clients: int = 8
) -> int:
    """Write distinct records from `clients` concurrent clients until `stop` or the server
    dies; every id answered 201 goes into `acknowledged`. Returns the failed writes."""
    failed = 0

    async def client(number: int) -> None:
        nonlocal failed
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            n = 0
            while not stop.is_set():
                rid = f"w{number}-{n}"
                n += 1
                try:
                    answer = await http.post(
                        "/v1/users/ada/sessions/s/messages" if n % 2 else "/v1/memories",
                        json={"messages": [{"role": "user", "content": f"turn {rid}"}]}
                        if n % 2
                        else {"text": f"note {rid}", "id": rid, "user_id": "ada"},
                        headers=key,
                    )
                except httpx.TransportError:
                    failed += 1
                    await asyncio.sleep(0.05)
                    continue
                if answer.status_code == 201:
                    body = answer.json()
                    acknowledged.extend(body["ids"] if "ids" in body else [body["id"]])

    await asyncio.gather(*(client(n) for n in range(clients)))
    return failed


@pytest.mark.parametrize("workers", [2])
def test_sigkill_mid_burst_loses_no_acknowledged_write(memory_location: dict, workers: int) -> None:
    db = db_argument(memory_location)
    acknowledged: list[str] = []
    with serve(db) as url, httpx.Client(base_url=url) as http:
        _, key = new_tenant(http)
    process, url = start(db, workers=workers)

    async def run() -> int:
        stop = asyncio.Event()
        burst = asyncio.create_task(_burst(url, key, acknowledged, stop))
        while len(acknowledged) < 150:
            await asyncio.sleep(0.01)
        kill(process)  # SIGKILL to the whole process group, writes in flight
        await asyncio.sleep(0.5)
        stop.set()
        return await burst

    failed = asyncio.run(run())
    assert failed > 0  # the burst really was cut off mid-flight
    with serve(db) as url, httpx.Client(base_url=url, timeout=30) as http:
        stored: set[str] = set()
        for first in range(0, len(acknowledged), 1000):
            found = http.post(
                "/v1/memories/lookup", json={"ids": acknowledged[first : first + 1000]}, headers=key
            )
            stored |= {row["id"] for row in found.json()["memories"]}
        assert set(acknowledged) <= stored, f"lost {len(set(acknowledged) - stored)} writes"
        assert http.post("/v1/memories/count", json={}, headers=key).json()["count"] >= len(
            set(acknowledged)
        )


@pytest.mark.postgres
def test_two_servers_on_one_postgres_see_each_others_writes(postgres_url: str) -> None:
    cache = {"MEMLAYER_SERVER_KEY_CACHE_S": "1"}  # how long a worker trusts a looked-up key
    with serve(postgres_url, env=cache) as one, serve(postgres_url, env=cache) as two:
        a, b = httpx.Client(base_url=one, timeout=30), httpx.Client(base_url=two, timeout=30)
        tenant_id, key = new_tenant(a)  # made through one, used through the other
        assert b.get("/v1/me", headers=key).json()["tenant_id"] == tenant_id
        for n in range(5):
            writer, reader = (a, b) if n % 2 == 0 else (b, a)
            rid = writer.post(
                "/v1/memories", json={"text": f"zebra fact number {n}"}, headers=key
            ).json()["id"]
            assert reader.get(f"/v1/memories/{rid}", headers=key).status_code == 200
            for mode in ("keyword", "vector"):
                hits = reader.post(
                    "/v1/search",
                    json={"query": f"zebra fact number {n}", "k": 1, "mode": mode},
                    headers=key,
                )
                assert hits.json()["hits"][0]["id"] == rid, mode
            assert reader.post("/v1/memories/count", json={}, headers=key).json()["count"] == n + 1
        a.post(
            "/v1/users/ada/sessions/s1/messages",
            json={"messages": [{"role": "user", "content": "hello"}]},
            headers=key,
        )
        assert b.get("/v1/users/ada/sessions", headers=key).json()["sessions"]
        assert b.delete("/v1/users/ada", headers=key).json() == {"deleted": 1}
        assert a.get("/v1/users/ada/export", headers=key).json()["sessions"] == []
        key_id = key["Authorization"].split("_")[1]
        a.delete(f"/v1/tenants/{tenant_id}/keys/{key_id}", headers=ADMIN_HEADERS)
        revoked_at = time.monotonic()
        assert a.get("/v1/me", headers=key).status_code == 401  # at once where revoked
        while b.get("/v1/me", headers=key).status_code != 401:  # within the cache's 1 s there
            assert time.monotonic() - revoked_at < 1.0 + 2.0, "the other server kept the key"
            time.sleep(0.05)
        a.close()
        b.close()


def test_serve_refuses_bad_workers_and_reports_a_missing_extra(tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "memlayer.cli", "serve", "--workers", "0", "--db", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--workers" in bad.stderr
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "fastapi.py").write_text("raise ImportError('not installed')\n")
    started = time.monotonic()
    missing = subprocess.run(
        [sys.executable, "-m", "memlayer.cli", "serve", "--db", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(blocked)},
    )
    assert missing.returncode == 2
    assert "pip install 'memlayer[server]'" in missing.stderr
    assert time.monotonic() - started < 120
