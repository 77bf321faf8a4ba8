"""`RemoteMemory` / `AsyncRemoteMemory` against a real `memlayer serve`: the Memory API with
the same answers and the same errors; LangChain's retriever and chat history over it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
import httpx
from server_process import new_tenant, serve

from memlayer import (
    AsyncRemoteMemory,
    AuthenticationError,
    ClosedError,
    InvalidInputError,
    NotFoundError,
    RemoteMemory,
    StorageError,
)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(str(tmp_path_factory.mktemp("remote"))) as url:
        yield url


@pytest.fixture
def api_key(service: str) -> str:
    with httpx.Client(base_url=service) as http:
        return new_tenant(http)[1]["Authorization"].removeprefix("Bearer ")


@pytest.fixture
def remote(service: str, api_key: str) -> Iterator[RemoteMemory]:
    with RemoteMemory(service, api_key=api_key) as memory:
        yield memory


def test_the_memory_api_over_http(remote: RemoteMemory) -> None:
    rid = remote.add("Ada prefers window seats.", user_id="ada", metadata={"kind": "pref"})
    remote.add("Ada's passport expires in March.", id="passport", user_id="ada")
    ids = remote.add_many(
        ["Bob is vegetarian.", {"text": "Bob likes tea", "id": "tea"}], user_id="bob"
    )
    assert ids[1] == "tea"
    hit = remote.get(rid, user_id="ada")
    assert hit is not None and hit.metadata == {"kind": "pref"} and hit.scope.user_id == "ada"
    assert remote.get(rid, user_id="bob") is None
    assert [h.id for h in remote.get_many(["tea", "nope", rid])] == ["tea", rid]
    assert remote.search("passport", k=1, mode="keyword", user_id="ada")[0].id == "passport"
    assert remote.count() == 4 and remote.count(user_id="bob") == 2
    assert remote.count(filters={"kind": "pref"}) == 1
    assert [h.id for h in remote.scan(user_id="ada")] == [rid, "passport"]
    assert [h.id for h in remote.scan(limit=1, offset=1)] == ["passport"]
    packed = remote.context("Ada travel", budget_tokens=50, user_id="ada")
    assert set(packed.ids) <= {rid, "passport"} and packed.tokens <= 50
    remote.update("passport", text="Ada's passport expires in May.", user_id="ada")
    assert "May" in remote.get("passport").text  # type: ignore[union-attr]
    vector_hits = remote.search_by_vector(_embedding(remote, "Bob likes tea"), k=1, user_id="bob")
    assert vector_hits[0].id == "tea"
    remote.delete("tea")
    assert remote.delete_many(["passport", "nope"]) == 1
    assert remote.delete_scope(user_id="bob") == 1
    assert remote.stats()["records"] == 1
    assert remote.ingest(["word " * 500], user_id="doc") >= 2


def _embedding(remote: RemoteMemory, text: str) -> list[float]:
    """The hash embedder's vector of `text` (the server embeds with the same)."""
    from memlayer.embedders import resolve_embedder

    return [float(x) for x in resolve_embedder("hash").embed([text])[0]]


def test_the_same_errors_as_memory(remote: RemoteMemory, service: str) -> None:
    with pytest.raises(InvalidInputError) as bad:
        remote.add("")
    assert bad.value.field == "text"
    with pytest.raises(InvalidInputError) as bad:
        remote.search("x", k=0)
    assert bad.value.field == "k"
    with pytest.raises(InvalidInputError) as bad:
        remote.add("x", tenant_id="someone-else")
    assert bad.value.field == "tenant_id"
    with pytest.raises(NotFoundError):
        remote.update("missing", text="x")
    with pytest.raises(NotFoundError):
        remote.delete("missing")
    with pytest.raises(InvalidInputError):
        remote.delete_scope()
    with pytest.raises(AuthenticationError), RemoteMemory(service, api_key="mlk_x_y") as wrong:
        wrong.count()
    with pytest.raises(StorageError), RemoteMemory("http://127.0.0.1:9", api_key="k") as gone:
        gone.count()
    remote.close()
    with pytest.raises(ClosedError):
        remote.count()


def test_async_remote_memory(service: str, api_key: str) -> None:
    async def run() -> None:
        async with AsyncRemoteMemory(service, api_key=api_key) as memory:
            rid = await memory.add("The meeting moved to 3pm.", session_id="s1")
            hits = await memory.search("meeting", mode="keyword", session_id="s1")
            assert hits[0].id == rid
            assert (await memory.get(rid)).text == "The meeting moved to 3pm."  # type: ignore[union-attr]
            assert await memory.count() == 1
            with pytest.raises(NotFoundError):
                await memory.delete("missing")
            await memory.delete(rid)
            assert await memory.scan() == []

    asyncio.run(run())


def test_langchain_retriever_and_chat_history_accept_a_remote_memory(remote: RemoteMemory) -> None:
    pytest.importorskip("langchain_core")
    from memlayer.integrations.langchain import (
        MemlayerChatMessageHistory,
        MemlayerRetriever,
        MemlayerVectorStore,
    )

    remote.add("Ada prefers window seats.", user_id="ada")
    retriever = MemlayerRetriever(memory=remote, k=1, mode="keyword", user_id="ada")
    assert retriever.invoke("seats")[0].page_content == "Ada prefers window seats."
    assert asyncio.run(retriever.ainvoke("seats"))[0].page_content == "Ada prefers window seats."
    history = MemlayerChatMessageHistory("chat-1", remote, user_id="ada")
    history.add_user_message("My cat is called Biscuit.")
    history.add_ai_message("Nice!")
    assert [m.content for m in history.messages] == ["My cat is called Biscuit.", "Nice!"]
    history.clear()
    assert history.messages == []
    with pytest.raises(InvalidInputError, match="in-process"):
        MemlayerVectorStore(remote)
