"""memlayer through LangChain's interfaces: options and overrides, scopes and tenants,
persistence across processes, chat history order under concurrent writers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core", reason="needs the langchain extra")

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from memlayer import AsyncMemory, InvalidInputError, Memory
from memlayer.integrations.langchain import (
    MemlayerChatMessageHistory,
    MemlayerRetriever,
    MemlayerVectorStore,
)


@pytest.fixture
def memory(open_memory: Callable[..., Memory]) -> Any:
    with open_memory(embedder="hash-256") as mem:
        mem.add("Ada prefers window seats", id="ada-seat", user_id="ada", metadata={"kind": "pref"})
        mem.add("Ada's passport expires in March", user_id="ada", metadata={"kind": "doc"})
        mem.add("Ada likes aisle seats on trains", user_id="ada", metadata={"kind": "pref"})
        mem.add("Bob prefers aisle seats", id="bob-seat", user_id="bob", metadata={"kind": "pref"})
        mem.add("Tenant two's seat plan", id="seat", tenant_id="two")
        yield mem


# -- retriever --------------------------------------------------------------------------


def test_retriever_documents_carry_score_id_created_at_and_scope(memory: Memory) -> None:
    docs = MemlayerRetriever(memory=memory, k=2, user_id="ada").invoke("window seats")
    assert docs[0].page_content == "Ada prefers window seats"
    first = docs[0]
    assert first.id == "ada-seat" and first.metadata["id"] == "ada-seat"
    assert first.metadata["kind"] == "pref" and first.metadata["user_id"] == "ada"
    assert first.metadata["score"] > docs[1].metadata["score"]
    assert first.metadata["created_at"] == memory.get("ada-seat").created_at  # type: ignore[union-attr]
    assert "tenant_id" not in first.metadata


def test_retriever_options_are_overridable_per_call(memory: Memory) -> None:
    retriever = MemlayerRetriever(memory=memory, k=3, user_id="ada", mode="vector")
    assert len(retriever.invoke("seats")) == 3
    assert len(retriever.invoke("seats", k=1)) == 1
    prefs = retriever.invoke("seats", filters={"kind": {"$eq": "pref"}})
    assert {d.metadata["kind"] for d in prefs} == {"pref"} and len(prefs) == 2
    assert [d.page_content for d in retriever.invoke("seats", user_id="bob")] == [
        "Bob prefers aisle seats"
    ]
    keyword = retriever.invoke("passport", mode="keyword")
    assert [d.page_content for d in keyword] == ["Ada's passport expires in March"]
    assert retriever.k == 3 and retriever.user_id == "ada"  # overrides do not stick


def test_retriever_never_crosses_tenants(memory: Memory) -> None:
    two = MemlayerRetriever(memory=memory, k=10, tenant_id="two")
    assert [d.page_content for d in two.invoke("seat")] == ["Tenant two's seat plan"]
    default = MemlayerRetriever(memory=memory, k=10)
    assert "Tenant two's seat plan" not in {d.page_content for d in default.invoke("seat plan")}


def test_retriever_refuses_unknown_options_and_bad_values(memory: Memory) -> None:
    retriever = MemlayerRetriever(memory=memory)
    with pytest.raises(InvalidInputError) as error:
        retriever.invoke("seats", top_k=2)
    assert error.value.field == "top_k"
    with pytest.raises(InvalidInputError) as error:
        retriever.invoke("seats", k=0)
    assert error.value.field == "k"
    with pytest.raises(InvalidInputError) as error:
        MemlayerRetriever(memory="not a memory")
    assert error.value.field == "memory"


def test_retriever_async_goes_through_async_memory(memory: Memory) -> None:
    calls: list[str] = []

    class Watched(AsyncMemory):
        async def search(self, query: str, **kwargs: Any) -> list[Any]:
            calls.append(query)
            return await super().search(query, **kwargs)

    watched = Watched.wrap(memory)
    retriever = MemlayerRetriever(memory=watched, k=2, user_id="ada")
    docs = asyncio.run(retriever.ainvoke("window seats"))
    assert calls == ["window seats"]
    assert [d.page_content for d in docs] == [
        d.page_content for d in retriever.invoke("window seats")
    ]


def test_retriever_reports_to_callbacks(memory: Memory) -> None:
    seen: list[list[Document]] = []

    class Recorder(BaseCallbackHandler):
        def on_retriever_end(self, documents: Any, **kwargs: Any) -> None:
            seen.append(list(documents))

    retriever = MemlayerRetriever(memory=memory, k=1, user_id="ada")
    docs = retriever.invoke("passport", config={"callbacks": [Recorder()]})
    assert seen == [docs]


def test_retriever_with_a_budget_returns_the_packed_context(memory: Memory) -> None:
    retriever = MemlayerRetriever(memory=memory, user_id="ada", context_budget_tokens=12)
    [doc] = retriever.invoke("window seats")
    expected = memory.context("window seats", budget_tokens=12, user_id="ada")
    assert doc.page_content == expected.text and doc.metadata["ids"] == expected.ids
    assert doc.metadata["tokens"] <= 12 and doc.metadata["ids"][0] == "ada-seat"
    [adoc] = asyncio.run(retriever.ainvoke("window seats"))
    assert adoc == doc


def test_retriever_in_a_chain(memory: Memory) -> None:
    retriever = MemlayerRetriever(memory=memory, k=1, user_id="ada")
    prompt = ChatPromptTemplate.from_messages([("human", "Context: {context}\nQ: {question}")])
    chain = {
        "context": retriever | RunnableLambda(lambda docs: docs[0].page_content),
        "question": RunnablePassthrough(),
    } | prompt
    rendered = chain.invoke("Where does Ada like to sit?").to_string()
    assert "Context: Ada prefers window seats" in rendered


# -- vector store -----------------------------------------------------------------------


def test_vector_store_filters_scopes_and_relevance(memory: Memory) -> None:
    ada = MemlayerVectorStore(memory, user_id="ada")
    found = ada.similarity_search("seats", k=5, filter={"kind": "pref"})
    assert {d.page_content for d in found} == {
        "Ada prefers window seats",
        "Ada likes aisle seats on trains",
    }
    assert found[0].metadata == {"kind": "pref"}
    scored = ada.similarity_search_with_relevance_scores("window seats", k=3)
    assert scored[0][0].id == "ada-seat" and all(0.0 <= s <= 1.0 for _, s in scored)
    assert [s for _, s in scored] == sorted((s for _, s in scored), reverse=True)
    assert ada.get_by_ids(["ada-seat"])[0].page_content == "Ada prefers window seats"


def test_vector_store_tenants_share_ids_but_not_records(memory: Memory) -> None:
    one = MemlayerVectorStore(memory)
    two = MemlayerVectorStore(memory, tenant_id="two")
    one.add_texts(["tenant one's note"], ids=["note"])
    two.add_texts(["tenant two's note"], ids=["note"])
    assert one.get_by_ids(["note"])[0].page_content == "tenant one's note"
    two.delete(["note", "seat"])
    assert two.get_by_ids(["note", "seat"]) == []
    assert one.get_by_ids(["note"])[0].page_content == "tenant one's note"
    assert memory.get("ada-seat", user_id="ada") is not None


def test_vector_store_mmr_prefers_diverse_documents(tmp_path: Path) -> None:
    with Memory(path=tmp_path, embedder="hash-256") as mem:
        store = MemlayerVectorStore(mem)
        store.add_texts(
            ["red apples", "red apples", "red apples", "green pears and red wine"],
            ids=["a1", "a2", "a3", "p"],
        )
        plain = [d.id for d in store.similarity_search("red apples", k=2)]
        diverse = [
            d.id for d in store.max_marginal_relevance_search("red apples", k=2, lambda_mult=0.25)
        ]
        assert set(plain) <= {"a1", "a2", "a3"}
        assert diverse[0] in {"a1", "a2", "a3"} and diverse[1] == "p"
        adiverse = asyncio.run(
            store.amax_marginal_relevance_search("red apples", k=2, lambda_mult=0.25)
        )
        assert [d.id for d in adiverse] == diverse


def test_vector_store_bad_input_changes_nothing(memory: Memory) -> None:
    store = MemlayerVectorStore(memory, user_id="ada")
    before = memory.count()
    for call, field in [
        (lambda: store.add_texts(["a", "b"], metadatas=[{}]), "metadatas"),
        (lambda: store.add_texts(["a"], ids=["x", "y"]), "ids"),
        (lambda: store.add_texts(["ok", ""]), "items[1].text"),
        (lambda: store.delete(), "ids"),
        (lambda: store.similarity_search("x", filter={"kind": {"$near": 1}}), "filters"),
        (lambda: MemlayerVectorStore(memory, path="elsewhere"), "memory"),
    ]:
        with pytest.raises(InvalidInputError) as error:
            call()
        assert error.value.field.startswith(field), error.value.field
    assert memory.count() == before


WRITE_STORE = """
import sys
from langchain_core.embeddings import DeterministicFakeEmbedding
from memlayer.integrations.langchain import MemlayerVectorStore
store = MemlayerVectorStore.from_texts(
    ["the first note", "the second note"], DeterministicFakeEmbedding(size=32),
    metadatas=[{"n": 1}, {"n": 2}], ids=["n1", "n2"], path=sys.argv[1], user_id="ada",
)
store.close()
"""


def test_vector_store_persists_across_processes(tmp_path: Path) -> None:
    from langchain_core.embeddings import DeterministicFakeEmbedding

    subprocess.run([sys.executable, "-c", WRITE_STORE, str(tmp_path)], check=True)
    store = MemlayerVectorStore(
        embedding=DeterministicFakeEmbedding(size=32), path=tmp_path, user_id="ada"
    )
    try:
        found = store.similarity_search("the second note", k=2)
        assert [(d.id, d.metadata) for d in found] == [("n2", {"n": 2}), ("n1", {"n": 1})]
    finally:
        store.close()


def test_vector_store_refuses_a_different_embedding_on_reopen(tmp_path: Path) -> None:
    from langchain_core.embeddings import DeterministicFakeEmbedding, FakeEmbeddings

    from memlayer import ModelMismatchError

    MemlayerVectorStore(embedding=DeterministicFakeEmbedding(size=32), path=tmp_path).close()
    with pytest.raises(ModelMismatchError):
        MemlayerVectorStore(embedding=FakeEmbeddings(size=32), path=tmp_path)
    with pytest.raises(InvalidInputError) as error:
        MemlayerVectorStore(embedding=DeterministicFakeEmbedding(size=16), path=tmp_path)
    assert error.value.field == "embedder"


# -- chat history -----------------------------------------------------------------------


def conversation() -> list[BaseMessage]:
    return [
        SystemMessage("You are a travel agent."),
        HumanMessage("My cat is called Tom.", id="h1", name="ada"),
        AIMessage(
            "",
            tool_calls=[{"name": "remember", "args": {"fact": "cat Tom"}, "id": "call-1"}],
            response_metadata={"model": "tiny"},
        ),
        ToolMessage("stored", tool_call_id="call-1", artifact={"rows": 1}),
        AIMessage([{"type": "text", "text": "Noted: Tom."}], additional_kwargs={"x": [1, 2]}),
    ]


def test_chat_history_round_trips_every_message_type(memory: Memory) -> None:
    history = MemlayerChatMessageHistory("s1", memory, user_id="ada")
    history.add_messages(conversation())
    assert history.messages == conversation()
    assert MemlayerChatMessageHistory("s2", memory, user_id="ada").messages == []
    assert MemlayerChatMessageHistory("s1", memory, tenant_id="two").messages == []


def test_chat_history_is_recalled_by_the_retriever(memory: Memory) -> None:
    history = MemlayerChatMessageHistory("s1", memory, user_id="ada")
    history.add_messages(conversation())
    for turn in range(30):
        history.add_messages([HumanMessage(f"filler turn {turn}"), AIMessage(f"ok {turn}")])
    recalled = MemlayerRetriever(memory=memory, k=1, session_id="s1").invoke("cat called Tom")
    assert recalled[0].page_content == "My cat is called Tom."
    assert recalled[0].metadata["role"] == "human"
    tools = MemlayerRetriever(memory=memory, k=1, session_id="s1").invoke(
        "remember", mode="keyword"
    )
    assert "remember" in tools[0].page_content


def test_chat_history_clear_keeps_other_memories(memory: Memory) -> None:
    memory.add("a fact of the session", session_id="s1", user_id="ada")
    history = MemlayerChatMessageHistory("s1", memory, user_id="ada")
    history.add_messages(conversation())
    history.clear()
    assert history.messages == []
    assert [h.text for h in memory.scan(session_id="s1")] == ["a fact of the session"]


def test_chat_history_async_twins(memory: Memory) -> None:
    history = MemlayerChatMessageHistory("s1", AsyncMemory.wrap(memory))

    async def run() -> list[BaseMessage]:
        await history.aadd_messages(conversation()[:2])
        await history.aadd_messages(conversation()[2:])
        return await history.aget_messages()

    assert asyncio.run(run()) == conversation()
    asyncio.run(history.aclear())
    assert history.messages == []


def test_chat_history_refuses_what_is_not_a_message(memory: Memory) -> None:
    history = MemlayerChatMessageHistory("s1", memory)
    with pytest.raises(InvalidInputError) as error:
        history.add_messages([HumanMessage("fine"), "not a message"])  # type: ignore[list-item]
    assert error.value.field == "messages[1]"
    assert history.messages == []


APPEND = """
import sys
from langchain_core.messages import HumanMessage
from memlayer import Memory
from memlayer.integrations.langchain import MemlayerChatMessageHistory
folder, name = sys.argv[1], sys.argv[2]
with Memory(path=folder, embedder="hash-256") as memory:
    history = MemlayerChatMessageHistory("shared", memory)
    for i in range(25):
        history.add_messages([HumanMessage(f"{name} {i}")])
"""


@pytest.mark.slow
def test_chat_history_order_under_concurrent_appends(tmp_path: Path) -> None:
    writers = [
        subprocess.Popen([sys.executable, "-c", APPEND, str(tmp_path), name])
        for name in ("a", "b", "c")
    ]
    assert [w.wait(timeout=300) for w in writers] == [0, 0, 0]
    seen = []
    for _ in range(2):
        with Memory(path=tmp_path, embedder="hash-256") as memory:
            seen.append([m.text for m in MemlayerChatMessageHistory("shared", memory).messages])
    assert seen[0] == seen[1] and len(seen[0]) == 75
    for name in ("a", "b", "c"):
        own = [int(text.split()[1]) for text in seen[0] if text.startswith(name)]
        assert own == list(range(25))
    assert json.dumps(seen[0]) != json.dumps(sorted(seen[0]))  # the writers did interleave


@pytest.mark.slow
def test_the_example_agent_recalls_a_fact_from_forty_turns_back() -> None:
    example = Path(__file__).parent.parent / "examples" / "langchain_agent.py"
    run = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "recalled from 40 turns back: yes" in run.stdout
