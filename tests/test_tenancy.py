"""Tenant isolation, tried as an attacker would: ids collide across tenants, and every read and
write path, from every tenant, must see and touch only that tenant's records."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memlayer import AsyncMemory, Memory, NotFoundError

TENANTS = (None, "acme", "globex")
IDS = ("note-1", "note-2", "shared")
USERS = (None, "ada", "bob")
# the backend fixtures are per test, and each example opens its own fresh store
UNHURRIED = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
WORDS = ("travel", "policy", "window", "seat", "budget", "invoice", "meeting", "lunch")

record = st.tuples(
    st.sampled_from(TENANTS),
    st.sampled_from(IDS),
    st.sampled_from(USERS),
    st.lists(st.sampled_from(WORDS), min_size=2, max_size=5).map(" ".join),
)


def _model(records: list[tuple[str | None, str, str | None, str]]) -> dict:
    """(tenant, id) -> (text, user): what a correct store holds after these adds in order."""
    state: dict[tuple[str | None, str], tuple[str, str | None]] = {}
    for tenant, rid, user, text in records:
        state[(tenant, rid)] = (f"{text} [{tenant}/{rid}]", user)
    return state


def _fill(memory: Memory, records: list[tuple[str | None, str, str | None, str]]) -> None:
    for tenant, rid, user, text in records:
        memory.add(f"{text} [{tenant}/{rid}]", id=rid, tenant_id=tenant, user_id=user)


def _snapshot(memory: Memory) -> dict:
    """Every record of every tenant, read through the API."""
    return {
        (tenant, rid): (hit.text, hit.scope.user_id)
        for tenant in TENANTS
        for rid in IDS
        if (hit := memory.get(rid, tenant_id=tenant)) is not None
    }


@settings(max_examples=25, deadline=None, suppress_health_check=UNHURRIED)
@given(records=st.lists(record, min_size=1, max_size=14), probe=st.sampled_from(WORDS))
def test_every_read_path_sees_only_its_tenant(
    new_memory_location: Callable[[], dict], records: list, probe: str
) -> None:
    with Memory(**new_memory_location(), embedder="hash") as memory:
        _fill(memory, records)
        model = _model(records)
        assert _snapshot(memory) == model
        for tenant in TENANTS:
            mine = {rid: value for (t, rid), value in model.items() if t == tenant}
            assert memory.count(tenant_id=tenant) == len(mine)
            for rid in IDS:
                hit = memory.get(rid, tenant_id=tenant)
                assert (hit is None) == (rid not in mine)
                for user in ("ada", "bob"):
                    narrowed = memory.get(rid, tenant_id=tenant, user_id=user)
                    assert (narrowed is not None) == (rid in mine and mine[rid][1] == user)
            for mode in ("vector", "keyword", "hybrid"):
                hits = memory.search(f"{probe} seat", k=10, mode=mode, tenant_id=tenant)
                assert all(h.scope.tenant_id == tenant for h in hits)
                assert all(mine[h.id][0] == h.text for h in hits)
                if mode == "vector":
                    assert len(hits) == min(10, len(mine))
            context = memory.context(probe, budget_tokens=200, tenant_id=tenant)
            assert set(context.ids) <= set(mine)
            assert all(f"[{tenant}/" in part for part in context.text.split("\n\n") if part)


@settings(max_examples=25, deadline=None, suppress_health_check=UNHURRIED)
@given(
    records=st.lists(record, min_size=1, max_size=12),
    actor=st.sampled_from(TENANTS),
    victim_id=st.sampled_from(IDS),
    user=st.sampled_from(USERS),
)
def test_writes_never_touch_another_tenant(
    new_memory_location: Callable[[], dict],
    records: list,
    actor: str | None,
    victim_id: str,
    user: str | None,
) -> None:
    with Memory(**new_memory_location(), embedder="hash") as memory:
        _fill(memory, records)
        model = _model(records)
        foreign = {key: value for key, value in model.items() if key[0] != actor}
        scope = {"tenant_id": actor, "user_id": user}
        mine = (actor, victim_id) in model and (
            user is None or model[(actor, victim_id)][1] == user
        )

        if mine:
            memory.update(victim_id, metadata={"touched": True}, **scope)
        else:
            with pytest.raises(NotFoundError):
                memory.update(victim_id, text="overwritten", **scope)
            with pytest.raises(NotFoundError):
                memory.delete(victim_id, **scope)
        memory.add("planted travel policy", id=victim_id, tenant_id=actor)
        if actor is not None or user is not None:
            memory.delete_scope(tenant_id=actor, user_id=user)

        after = _snapshot(memory)
        assert {key: value for key, value in after.items() if key[0] != actor} == foreign
        for tenant in TENANTS:
            if tenant != actor:
                assert all(
                    "planted" not in h.text for h in memory.search("planted", tenant_id=tenant)
                )


def test_not_found_is_the_same_for_foreign_and_missing_ids(
    open_memory: Callable[..., Memory],
) -> None:
    """No existence oracle: another tenant's id answers exactly like an id nobody has."""
    with open_memory(embedder="hash") as memory:
        memory.add("acme secret", id="secret", tenant_id="acme")
        errors = []
        for rid in ("secret", "nobody-has-this"):
            assert memory.get(rid, tenant_id="globex") is None
            for call in (memory.delete, lambda i, **s: memory.update(i, text="x", **s)):
                with pytest.raises(NotFoundError) as info:
                    call(rid, tenant_id="globex")
                errors.append(str(info.value).replace(rid, "<id>"))
        assert errors[:2] == errors[2:]
        assert memory.get("secret") is None  # the default tenant is a tenant too
        assert memory.get("secret", tenant_id="acme").text == "acme secret"


def test_same_id_in_two_tenants_is_two_records(open_memory: Callable[..., Memory]) -> None:
    """The reported hole: an add in tenant B replaced tenant A's record with the same id."""
    with open_memory(embedder="hash") as memory:
        memory.add("A's note", id="note-1", tenant_id="A")
        memory.add("B's note", id="note-1", tenant_id="B")
        assert memory.count(tenant_id="A") == 1 and memory.count(tenant_id="B") == 1
        assert memory.get("note-1", tenant_id="A").text == "A's note"
        assert memory.get("note-1", tenant_id="B").text == "B's note"
        memory.delete("note-1", tenant_id="B")
        assert memory.get("note-1", tenant_id="A").text == "A's note"
        assert [h.id for h in memory.search("note", mode="vector", tenant_id="A")] == ["note-1"]


def test_async_by_id_calls_are_scoped(memory_location: dict) -> None:
    async def scenario() -> None:
        async with AsyncMemory(**memory_location, embedder="hash") as memory:
            await memory.add("acme plan", id="p", tenant_id="acme")
            await memory.add("globex plan", id="p", tenant_id="globex")
            assert (await memory.get("p", tenant_id="acme")).text == "acme plan"
            await memory.update("p", text="globex plan v2", tenant_id="globex")
            await memory.delete("p", tenant_id="globex")
            with pytest.raises(NotFoundError):
                await memory.delete("p", tenant_id="globex")
            assert (await memory.get("p", tenant_id="acme")).text == "acme plan"

    asyncio.run(scenario())


def test_a_store_written_by_0_1_0_opens_migrated(tmp_path: Path) -> None:
    """tests/fixtures/memory-0.1.0 was written by memlayer 0.1.0 (ids unique across tenants,
    FTS over raw text); it must open with every record, index and id intact."""
    folder = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "fixtures" / "memory-0.1.0", folder)
    with Memory(path=folder, embedder="hash") as memory:
        assert memory.stats()["records"] == 9 and memory.stats()["vectors"] == 9
        hit = memory.get("note-1", tenant_id="acme")
        assert hit.text == "Ada prefers window seats."
        assert hit.metadata == {"kind": "pref", "doc": {"year": 2024}}
        assert hit.scope.user_id == "ada"
        assert memory.get("note-1") is None
        assert memory.get("note-3", session_id="s1").text == "The meeting moved to 3pm."
        assert memory.get("note-2", tenant_id="globex").text == "Bob is vegan."
        assert memory.get("gone", tenant_id="acme") is None
        assert memory.count(tenant_id="acme", agent_id="planner") == 5
        assert [h.id for h in memory.search("東京", mode="keyword", tenant_id="globex")] == ["jp-1"]
        top = memory.search("handbook travel policy", k=5, mode="vector", tenant_id="acme")
        assert {h.id for h in top} == {f"hb-{i}" for i in range(5)}
        memory.add("globex's own note-1", id="note-1", tenant_id="globex")
        assert memory.get("note-1", tenant_id="acme").text == "Ada prefers window seats."
    with Memory(path=folder, embedder="hash") as memory:  # migrated once, opens as current
        assert memory.count(tenant_id="globex") == 3
