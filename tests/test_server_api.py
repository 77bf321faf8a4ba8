"""Every endpoint of the memory service, success and error paths, in process (TestClient) on
both databases; the error body is always `{"error": {"code", "message", "field"}}`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from server_process import ADMIN, new_tenant

from memlayer import Memory
from memlayer.integrations.server import ServerSettings, create_app


@pytest.fixture
def client(open_memory: Callable[..., Memory]) -> Iterator[TestClient]:
    settings = ServerSettings(admin_token=ADMIN, rate_per_s=0, max_body_bytes=64 * 1024)
    with TestClient(create_app(open_memory(embedder="hash"), settings, close_memory=True)) as c:
        yield c


@pytest.fixture
def key(client: TestClient) -> dict[str, str]:
    return new_tenant(client)[1]


def error(response: Any, status: int, code: str, field: str | None = None) -> str:
    """Assert a JSON error answer; returns its message."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code, body
    if field is not None:
        assert body["field"] == field, body
    return str(body["message"])


def test_memories_crud(client: TestClient, key: dict[str, str]) -> None:
    added = client.post(
        "/v1/memories",
        json={"text": "Ada likes window seats", "metadata": {"kind": "pref"}, "user_id": "ada"},
        headers=key,
    )
    assert added.status_code == 201
    rid = added.json()["id"]
    got = client.get(f"/v1/memories/{rid}", params={"user_id": "ada"}, headers=key).json()
    assert (got["text"], got["metadata"], got["user_id"]) == (
        "Ada likes window seats",
        {"kind": "pref"},
        "ada",
    )
    error(
        client.get(f"/v1/memories/{rid}", params={"user_id": "bob"}, headers=key), 404, "not_found"
    )
    patched = client.patch(
        f"/v1/memories/{rid}", json={"text": "Ada likes aisle seats"}, headers=key
    )
    assert patched.status_code == 200 and patched.json()["text"] == "Ada likes aisle seats"
    assert patched.json()["metadata"] == {"kind": "pref"}
    error(client.patch("/v1/memories/nope", json={"text": "x"}, headers=key), 404, "not_found")
    with_id = client.post(
        "/v1/memories", json={"text": "slashes", "id": "a/b c", "user_id": "ada"}, headers=key
    )
    assert with_id.json()["id"] == "a/b c"
    assert client.get("/v1/memories/a%2Fb%20c", headers=key).json()["text"] == "slashes"
    assert client.delete("/v1/memories/a%2Fb%20c", headers=key).status_code == 204
    error(client.delete("/v1/memories/a%2Fb%20c", headers=key), 404, "not_found")
    assert client.delete(f"/v1/memories/{rid}", headers=key).status_code == 204
    error(client.get(f"/v1/memories/{rid}", headers=key), 404, "not_found")


def test_bulk_lookup_delete_count_scan_and_pages(client: TestClient, key: dict[str, str]) -> None:
    items = [{"text": f"note {n}", "metadata": {"n": n}} for n in range(7)]
    ids = client.post("/v1/memories/bulk", json={"items": items, "user_id": "u"}, headers=key)
    assert ids.status_code == 201
    ids_list = ids.json()["ids"]
    assert len(ids_list) == 7
    count = client.post("/v1/memories/count", json={"filters": {"n": {"$gte": 3}}}, headers=key)
    assert count.json() == {"count": 4}
    pages, offset = [], 0
    while offset is not None:
        page = client.get("/v1/memories", params={"offset": offset, "limit": 3}, headers=key)
        pages.append([m["id"] for m in page.json()["memories"]])
        offset = page.json()["next_offset"]
    assert pages == [ids_list[0:3], ids_list[3:6], ids_list[6:]]
    scanned = client.post(
        "/v1/memories/scan", json={"filters": {"n": {"$lt": 2}}, "user_id": "u"}, headers=key
    )
    assert [m["id"] for m in scanned.json()["memories"]] == ids_list[:2]
    looked = client.post(
        "/v1/memories/lookup", json={"ids": [ids_list[2], "missing", ids_list[0]]}, headers=key
    )
    assert [m["id"] for m in looked.json()["memories"]] == [ids_list[2], ids_list[0]]
    deleted = client.post(
        "/v1/memories/delete", json={"ids": [*ids_list[:2], "missing"]}, headers=key
    )
    assert deleted.json() == {"deleted": 2}
    error(client.delete("/v1/memories", headers=key), 422, "invalid_input", "scope")
    assert client.delete("/v1/memories", params={"user_id": "u"}, headers=key).json() == {
        "deleted": 5
    }
    error(
        client.get("/v1/memories", params={"limit": 1001}, headers=key),
        422,
        "invalid_input",
        "limit",
    )
    error(
        client.post("/v1/memories/bulk", json={"items": []}, headers=key),
        422,
        "invalid_input",
        "items",
    )
    repeated = {"items": [{"text": "a", "id": "x"}, {"text": "b", "id": "x"}]}
    error(
        client.post("/v1/memories/bulk", json=repeated, headers=key), 422, "invalid_input", "items"
    )


def test_bad_input_is_a_4xx_naming_the_field_and_changes_nothing(
    client: TestClient, key: dict[str, str]
) -> None:
    cases = [
        ({"text": ""}, "text"),
        ({"text": 3}, "text"),
        ({"text": "x", "metadata": [1]}, "metadata"),
        ({"text": "x", "tenant_id": "someone-else"}, "tenant_id"),
        ({"text": "x", "user_id": ""}, "user_id"),
        ({"text": "x", "id": "i" * 129}, "id"),
        ({"text": "x" * 100_001}, "body"),
        ({"text": "lone \ud800 surrogate"}, "text"),
        (
            {
                "text": "x",
                "metadata": {
                    "deep": {
                        "a": {
                            "b": {
                                "c": {
                                    "d": {
                                        "e": {
                                            "f": {
                                                "g": {
                                                    "h": {
                                                        "i": {
                                                            "j": {
                                                                "k": {
                                                                    "l": {
                                                                        "m": {"n": {"o": {"p": 1}}}
                                                                    }
                                                                }
                                                            }
                                                        }
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                },
            },
            "metadata",
        ),
    ]
    json_headers = {**key, "content-type": "application/json"}
    for body, field in cases:  # json.dumps escapes the lone surrogate as JSON allows
        answer = client.post("/v1/memories", content=json.dumps(body), headers=json_headers)
        assert 400 <= answer.status_code < 500, (body, answer.text)
        assert answer.json()["error"]["field"] == field, (field, answer.text)
    bad_json = client.post("/v1/memories", content=b"{not json", headers=json_headers)
    error(bad_json, 422, "invalid_input")
    assert client.post("/v1/memories/count", json={}, headers=key).json() == {"count": 0}


def test_search_and_search_by_vector(client: TestClient, key: dict[str, str]) -> None:
    client.post(
        "/v1/memories/bulk",
        json={
            "items": [{"text": "the cat sat on the mat"}, {"text": "stock prices fell"}],
            "user_id": "u",
        },
        headers=key,
    )
    for mode in ("hybrid", "vector", "keyword"):
        hits = client.post(
            "/v1/search", json={"query": "cat on a mat", "k": 1, "mode": mode}, headers=key
        ).json()["hits"]
        assert [h["text"] for h in hits] == ["the cat sat on the mat"], mode
    error(
        client.post("/v1/search", json={"query": "x", "mode": "psychic"}, headers=key),
        422,
        "invalid_input",
        "mode",
    )
    error(
        client.post("/v1/search", json={"query": " ", "k": 3}, headers=key),
        422,
        "invalid_input",
        "query",
    )
    error(
        client.post("/v1/search", json={"query": "x", "filters": {"$bad": 1}}, headers=key),
        422,
        "invalid_input",
        "filters.$bad",
    )
    error(
        client.post("/v1/search", json={"query": "x", "k": 0}, headers=key),
        422,
        "invalid_input",
        "k",
    )
    me = client.get("/v1/me", headers=key).json()
    assert me["records"] == 2
    stored = client.post("/v1/memories/scan", json={}, headers=key).json()["memories"]
    dim = 256
    vector = [1.0] + [0.0] * (dim - 1)
    answer = client.post("/v1/search/vector", json={"vector": vector, "k": 2}, headers=key)
    if answer.status_code == 422:  # the hash embedder's width differs: the error names it
        assert answer.json()["error"]["field"] == "vector"
        width = int(answer.json()["error"]["message"].split("(")[1].split(",")[0])
        vector = [1.0] + [0.0] * (width - 1)
        answer = client.post("/v1/search/vector", json={"vector": vector, "k": 2}, headers=key)
    assert {h["id"] for h in answer.json()["hits"]} == {m["id"] for m in stored}
    error(
        client.post("/v1/search/vector", json={"vector": [0.0] * len(vector)}, headers=key),
        422,
        "invalid_input",
        "vector",
    )


def test_context_ranked_and_crag(client: TestClient, key: dict[str, str]) -> None:
    texts = ["Battery lasts 30 hours.", "Delivery took 9 days.", "The hinge wobbles."]
    client.post("/v1/memories/bulk", json={"items": [{"text": t} for t in texts]}, headers=key)
    for strategy in ("ranked", "crag"):
        packed = client.post(
            "/v1/context",
            json={"query": "battery life", "budget_tokens": 40, "strategy": strategy},
            headers=key,
        )
        assert packed.status_code == 200, packed.text
        body = packed.json()
        assert body["ids"] and body["tokens"] <= 40 and body["parts"]
        assert set(body["ids"]) <= {
            m["id"]
            for m in client.post("/v1/memories/scan", json={}, headers=key).json()["memories"]
        }
    error(
        client.post("/v1/context", json={"query": "x", "budget_tokens": 0}, headers=key),
        422,
        "invalid_input",
        "budget_tokens",
    )
    error(
        client.post(
            "/v1/context", json={"query": "x", "budget_tokens": 9, "strategy": "magic"}, headers=key
        ),
        422,
        "invalid_input",
        "strategy",
    )


def test_users_sessions_messages_export_and_forget(client: TestClient, key: dict[str, str]) -> None:
    opened = client.post("/v1/users/ada/sessions", json={"session_id": "s1"}, headers=key)
    assert opened.status_code == 201 and opened.json()["session_id"] == "s1"
    turns = [
        {"role": "user", "content": "My cat is called Biscuit.", "metadata": {"lang": "en"}},
        {"role": "assistant", "content": "Nice name!"},
    ]
    appended = client.post(
        "/v1/users/ada/sessions/s1/messages", json={"messages": turns}, headers=key
    )
    assert appended.status_code == 201 and len(appended.json()["ids"]) == 2
    # appending to a session that does not exist yet opens it
    client.post(
        "/v1/users/ada/sessions/s2/messages",
        json={"messages": [{"role": "user", "content": "Second chat"}], "agent_id": "bot"},
        headers=key,
    )
    client.post(
        "/v1/users/bob/sessions/s1/messages",
        json={"messages": [{"role": "user", "content": "Bob's cat is Rex"}]},
        headers=key,
    )
    listed = client.get("/v1/users/ada/sessions/s1/messages", headers=key).json()["messages"]
    assert [(m["role"], m["content"], m["metadata"]) for m in listed] == [
        ("user", "My cat is called Biscuit.", {"lang": "en"}),
        ("assistant", "Nice name!", {}),
    ]
    page = client.get("/v1/users/ada/sessions/s1/messages", params={"limit": 1}, headers=key)
    assert page.json()["next_offset"] == 1
    sessions = client.get("/v1/users/ada/sessions", headers=key).json()["sessions"]
    assert [s["session_id"] for s in sessions] == ["s1", "s2"]
    assert client.get("/v1/users/ada/sessions/s2", headers=key).json()["session_id"] == "s2"
    error(client.get("/v1/users/ada/sessions/s9", headers=key), 404, "not_found")
    error(client.get("/v1/users/ada/sessions/s9/messages", headers=key), 404, "not_found")
    assert client.get("/v1/users", headers=key).json()["users"] == ["ada", "bob"]
    recalled = client.post(
        "/v1/search", json={"query": "Biscuit", "k": 1, "user_id": "ada"}, headers=key
    ).json()["hits"]
    assert recalled[0]["text"] == "My cat is called Biscuit."
    exported = client.get("/v1/users/ada/export", headers=key).json()
    assert [m["text"] for m in exported["memories"]] == [
        "My cat is called Biscuit.",
        "Nice name!",
        "Second chat",
    ]
    assert [s["session_id"] for s in exported["sessions"]] == ["s1", "s2"]
    assert client.delete("/v1/users/ada/sessions/s2", headers=key).json() == {"deleted": 1}
    error(client.delete("/v1/users/ada/sessions/s2", headers=key), 404, "not_found")
    assert client.delete("/v1/users/ada", headers=key).json() == {"deleted": 2}
    forgotten = client.get("/v1/users/ada/export", headers=key).json()
    assert forgotten["memories"] == [] and forgotten["sessions"] == []
    assert client.get("/v1/users", headers=key).json()["users"] == ["bob"]
    nothing_left = client.post("/v1/memories/count", json={"user_id": "ada"}, headers=key)
    assert nothing_left.json() == {"count": 0}
    error(
        client.post("/v1/users/ada/sessions/s1/messages", json={"messages": []}, headers=key),
        422,
        "invalid_input",
        "messages",
    )
    error(
        client.post(
            "/v1/users/ada/sessions/s1/messages",
            json={"messages": [{"role": "", "content": "x"}]},
            headers=key,
        ),
        422,
        "invalid_input",
        "messages.0.role",
    )


def test_admin_tenants_and_keys(client: TestClient) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    made = client.post("/v1/tenants", json={"tenant_id": "acme", "name": "Acme"}, headers=admin)
    assert made.status_code == 201 and made.json()["name"] == "Acme"
    error(
        client.post("/v1/tenants", json={"tenant_id": "acme"}, headers=admin),
        422,
        "invalid_input",
        "tenant_id",
    )
    error(
        client.post("/v1/tenants", json={"tenant_id": "bad id!"}, headers=admin),
        422,
        "invalid_input",
        "tenant_id",
    )
    assert client.get("/v1/tenants/acme", headers=admin).json()["tenant_id"] == "acme"
    error(client.get("/v1/tenants/nobody", headers=admin), 404, "not_found")
    assert [t["tenant_id"] for t in client.get("/v1/tenants", headers=admin).json()["tenants"]] == [
        "acme"
    ]
    key = client.post("/v1/tenants/acme/keys", json={"name": "ci"}, headers=admin).json()
    assert key["api_key"].startswith("mlk_") and key["name"] == "ci"
    error(client.post("/v1/tenants/nobody/keys", json={}, headers=admin), 404, "not_found")
    listed = client.get("/v1/tenants/acme/keys", headers=admin).json()["keys"]
    assert [k["key_id"] for k in listed] == [key["key_id"]]
    assert "api_key" not in listed[0] and "key_hash" not in listed[0]
    revoked = client.delete(f"/v1/tenants/acme/keys/{key['key_id']}", headers=admin).json()
    assert revoked["revoked_at"] is not None
    error(client.delete("/v1/tenants/acme/keys/nope", headers=admin), 404, "not_found")


def test_health_readiness_metrics_and_unknown_routes(
    client: TestClient, key: dict[str, str]
) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    client.post("/v1/search", json={"query": "x"}, headers=key)
    client.post("/v1/search", json={"query": "x", "k": -1}, headers=key)
    error(client.get("/v1/no-such-thing", headers=key), 404, "not_found")
    error(client.put("/v1/memories", headers=key), 405, "method_not_allowed")
    text = client.get("/metrics").text
    assert 'memlayer_http_requests_total{method="POST",route="/v1/search",status="200"} 1.0' in text
    assert 'memlayer_http_requests_total{method="POST",route="/v1/search",status="422"} 1.0' in text
    assert 'memlayer_http_request_duration_seconds_bucket{le="0.05",method="POST",' in text


def test_body_limit_rate_limit_and_timeout(open_memory: Callable[..., Memory]) -> None:
    settings = ServerSettings(admin_token=ADMIN, max_body_bytes=2048, rate_per_s=0.01, rate_burst=3)
    with TestClient(create_app(open_memory(embedder="hash"), settings, close_memory=True)) as c:
        _, key = new_tenant(c)
        error(
            c.post("/v1/memories", json={"text": "x" * 4000}, headers=key), 413, "too_large", "body"
        )
        chunked = c.post(
            "/v1/memories",
            content=iter([b'{"text": "', b"x" * 4000, b'"}']),
            headers={**key, "content-type": "application/json"},
        )
        error(chunked, 413, "too_large", "body")
        for _ in range(3):  # the refused bodies were never read as far as the key
            assert c.post("/v1/memories/count", json={}, headers=key).status_code == 200
        limited = c.post("/v1/memories/count", json={}, headers=key)
        error(limited, 429, "rate_limited")
        assert int(limited.headers["Retry-After"]) >= 1
        _, other = new_tenant(c)  # another key has its own bucket
        assert c.post("/v1/memories/count", json={}, headers=other).status_code == 200


def test_work_over_the_time_limit_is_a_503(open_memory: Callable[..., Memory]) -> None:
    settings = ServerSettings(admin_token=ADMIN, timeout_s=1e-6)
    with TestClient(create_app(open_memory(embedder="hash"), settings, close_memory=True)) as c:
        slow = c.post("/v1/tenants", json={}, headers={"Authorization": f"Bearer {ADMIN}"})
        error(slow, 503, "timeout")


def test_a_write_whose_commit_fails_is_never_acknowledged(
    client: TestClient, key: dict[str, str]
) -> None:
    """A write's reply waits for its commit: when the database fails the commit the caller
    gets a 5xx, never 201, and nothing is stored (a server that answered first would
    acknowledge writes that a crash in between loses)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.exc import OperationalError

    def fail(conn: Any) -> None:
        raise OperationalError("COMMIT", {}, OSError("disk I/O error"))

    writes = [
        ("/v1/memories", {"text": "never stored", "id": "lost-1", "user_id": "ada"}),
        (
            "/v1/users/ada/sessions/s/messages",
            {"messages": [{"role": "user", "content": "never stored either"}]},
        ),
    ]
    event.listen(Engine, "commit", fail)
    try:
        answers = [client.post(path, json=body, headers=key) for path, body in writes]
    finally:
        event.remove(Engine, "commit", fail)
    for answer in answers:
        error(answer, 503, "storage")
    assert (
        client.get("/v1/memories/lost-1", params={"user_id": "ada"}, headers=key).status_code == 404
    )
    assert client.post("/v1/memories/count", json={}, headers=key).json()["count"] == 0
