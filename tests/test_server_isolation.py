"""Against a real `memlayer serve` process over HTTP: auth failures (no key, wrong key,
revoked key, another tenant's key), and tenants never see each other's data on any read or
search path, also with guessed ids."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx
from server_process import ADMIN_HEADERS, new_tenant, serve


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(str(tmp_path_factory.mktemp("served"))) as url:
        yield url


@pytest.fixture
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


DATA_PATHS = [
    ("GET", "/v1/me", None),
    ("GET", "/v1/memories", None),
    ("POST", "/v1/memories", {"text": "x"}),
    ("POST", "/v1/search", {"query": "x"}),
    ("POST", "/v1/context", {"query": "x", "budget_tokens": 10}),
    ("GET", "/v1/users", None),
    ("DELETE", "/v1/users/ada", None),
]


def test_data_endpoints_refuse_a_missing_wrong_or_revoked_key(http: httpx.Client) -> None:
    tenant, good = new_tenant(http)
    made = http.post(f"/v1/tenants/{tenant}/keys", json={}, headers=ADMIN_HEADERS).json()
    revoked = {"Authorization": f"Bearer {made['api_key']}"}
    assert http.get("/v1/me", headers=revoked).status_code == 200
    http.delete(f"/v1/tenants/{tenant}/keys/{made['key_id']}", headers=ADMIN_HEADERS)
    bad_keys = {
        "missing": {},
        "wrong": {"Authorization": "Bearer mlk_0000_not-a-key"},
        "not bearer": {"Authorization": f"Basic {made['api_key']}"},
        "revoked": revoked,
        "admin token": ADMIN_HEADERS,
    }
    for method, path, body in DATA_PATHS:
        for why, headers in bad_keys.items():
            answer = http.request(method, path, json=body, headers=headers)
            assert answer.status_code == 401, (why, method, path, answer.text)
            assert answer.json()["error"]["code"] == "unauthorized"
            assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert http.request(method, path, json=body, headers=good).status_code < 300
    # nothing was written by the refused calls
    assert http.get("/v1/me", headers=good).json()["records"] == 1


def test_admin_endpoints_refuse_api_keys_and_wrong_tokens(http: httpx.Client) -> None:
    tenant, key = new_tenant(http)
    for headers in ({}, key, {"Authorization": "Bearer wrong"}):
        for method, path in (
            ("POST", "/v1/tenants"),
            ("GET", "/v1/tenants"),
            ("GET", f"/v1/tenants/{tenant}"),
            ("POST", f"/v1/tenants/{tenant}/keys"),
            ("GET", f"/v1/tenants/{tenant}/keys"),
        ):
            answer = http.request(method, path, json={}, headers=headers)
            assert answer.status_code == 401, (headers, path, answer.text)


def test_a_key_of_one_tenant_cannot_reach_another_tenants_keys(http: httpx.Client) -> None:
    one, _ = new_tenant(http)
    two, _ = new_tenant(http)
    other_key = http.post(f"/v1/tenants/{two}/keys", json={}, headers=ADMIN_HEADERS).json()
    wrong_tenant = http.delete(
        f"/v1/tenants/{one}/keys/{other_key['key_id']}", headers=ADMIN_HEADERS
    )
    assert wrong_tenant.status_code == 404
    still = {"Authorization": f"Bearer {other_key['api_key']}"}
    assert http.get("/v1/me", headers=still).json()["tenant_id"] == two


def test_tenants_never_see_each_others_data(http: httpx.Client, tmp_path: Path) -> None:
    rng = random.Random(17)
    words = ["apple", "river", "cloud", "engine", "garden", "violet", "copper", "harbor"]
    tenants = [new_tenant(http) for _ in range(3)]
    owned: dict[str, set[str]] = {}
    shared_ids = ["shared-1", "shared-2"]  # the same ids in every tenant name different records
    for tenant_id, key in tenants:
        owned[tenant_id] = set()
        items = [
            {
                "text": " ".join(rng.choices(words, k=6)) + f" {tenant_id}",
                "metadata": {"n": n, "tag": rng.choice(["a", "b"])},
            }
            for n in range(20)
        ] + [{"text": f"{sid} of {tenant_id} apple river", "id": sid} for sid in shared_ids]
        for user in ("ada", "bob"):
            ids = http.post(
                "/v1/memories/bulk", json={"items": items, "user_id": user}, headers=key
            ).json()["ids"]
            owned[tenant_id] |= set(ids)
        messages = [{"role": "user", "content": f"chat of {tenant_id} apple"}]
        ids = http.post(
            "/v1/users/ada/sessions/s1/messages", json={"messages": messages}, headers=key
        ).json()["ids"]
        owned[tenant_id] |= set(ids)

    for tenant_id, key in tenants:
        mine = owned[tenant_id]
        others = set().union(*(ids for t, ids in owned.items() if t != tenant_id)) - set(shared_ids)
        seen: set[str] = set()

        def texts_are_mine(
            rows: list[dict], tenant: str = tenant_id, seen: set[str] = seen
        ) -> None:
            for row in rows:
                assert row["tenant_id"] == tenant and tenant in row["text"], row
                seen.add(row["id"])

        for query in [*words, "shared", "chat", "apple river"]:
            for mode in ("hybrid", "vector", "keyword"):
                body = {"query": query, "k": 100, "mode": mode}
                texts_are_mine(http.post("/v1/search", json=body, headers=key).json()["hits"])
                body["filters"] = {"tag": "a"}
                texts_are_mine(http.post("/v1/search", json=body, headers=key).json()["hits"])
            packed = http.post(
                "/v1/context", json={"query": query, "budget_tokens": 500, "k": 100}, headers=key
            ).json()
            assert set(packed["ids"]) <= mine
            assert all(t not in packed["text"] for t in owned if t != tenant_id)
        listing = http.get("/v1/memories", params={"limit": 1000}, headers=key).json()
        texts_are_mine(listing["memories"])
        texts_are_mine(
            http.post("/v1/memories/scan", json={"limit": 1000}, headers=key).json()["memories"]
        )
        for user in ("ada", "bob"):
            exported = http.get(f"/v1/users/{user}/export", headers=key).json()
            texts_are_mine(exported["memories"])
        messages = http.get("/v1/users/ada/sessions/s1/messages", headers=key).json()
        assert [m["content"] for m in messages["messages"]] == [f"chat of {tenant_id} apple"]
        assert seen == mine  # every read path together showed all of the tenant's own
        assert http.post("/v1/memories/count", json={}, headers=key).json()["count"] == len(mine)
        assert http.get("/v1/me", headers=key).json()["records"] == len(mine)

        # guessed ids: every id of the other tenants is answered as one that does not exist
        guesses = sorted(others)
        found = http.post("/v1/memories/lookup", json={"ids": guesses}, headers=key).json()
        assert found["memories"] == []
        for guess in rng.sample(guesses, 10):
            assert http.get(f"/v1/memories/{guess}", headers=key).status_code == 404
            patch = http.patch(f"/v1/memories/{guess}", json={"text": "hijacked"}, headers=key)
            assert patch.status_code == 404
            assert http.delete(f"/v1/memories/{guess}", headers=key).status_code == 404
        deleted = http.post("/v1/memories/delete", json={"ids": guesses}, headers=key).json()
        assert deleted == {"deleted": 0}
        for sid in shared_ids:
            hit = http.get(f"/v1/memories/{sid}", headers=key).json()
            assert hit["tenant_id"] == tenant_id and tenant_id in hit["text"]

    # forgetting a user in one tenant leaves the same user id in the others alone
    first_key = tenants[0][1]
    http.delete("/v1/users/ada", headers=first_key)
    for _, key in tenants[1:]:
        exported = http.get("/v1/users/ada/export", headers=key).json()
        assert len(exported["memories"]) == 21 and exported["sessions"]  # 20 + a message
    assert http.get("/v1/users/ada/export", headers=first_key).json()["memories"] == []
    for _, key in tenants:  # nothing of another tenant was changed by the attempts
        rows = http.post("/v1/memories/scan", json={"limit": 1000}, headers=key).json()
        assert all("hijacked" not in row["text"] for row in rows["memories"])
