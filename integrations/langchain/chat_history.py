"""`MemlayerChatMessageHistory`: a chat session's messages kept in memlayer, in order, and
indexed as memories so a retriever can recall old turns."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage, message_to_dict, messages_from_dict

from memlayer import Hit, InvalidInputError, Memory
from memlayer.integrations.langchain.documents import MemoryPair

KIND = "chat_message"
_MESSAGES = {"kind": KIND}


class MemlayerChatMessageHistory(BaseChatMessageHistory):
    """The messages of one chat session, persistent and ordered.

    Each message is one memory record in the scope `session_id` (plus the optional tenant,
    user and agent): its text is the message's text, so `Memory.search` and
    `MemlayerRetriever` find it; its metadata holds the whole message (`kind`,
    `role`, and LangChain's serialised form), so every message type, tool calls included,
    comes back as it was added. Order is the order the store committed the appends, the
    same for every reader, also when several writers append at once.
    """

    def __init__(
        self,
        session_id: str,
        memory: Any = None,
        *,
        path: str | Path | None = None,
        tenant_id: str | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
    ):
        if memory is not None and path is not None:
            raise InvalidInputError("path", "give either an open memory or a path, not both")
        self._owns_memory = memory is None
        self._pair = MemoryPair.of(memory if memory is not None else Memory(path=path))
        scope = {"tenant_id": tenant_id, "user_id": user_id, "agent_id": agent_id}
        self.scope: dict[str, Any] = {k: v for k, v in scope.items() if v is not None}
        self.scope["session_id"] = session_id

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """Every message of the session, oldest first."""
        return _messages(self._pair.sync.scan(filters=_MESSAGES, **self.scope))

    async def aget_messages(self) -> list[BaseMessage]:
        """See `messages`."""
        return _messages(await self._pair.aio.scan(filters=_MESSAGES, **self.scope))

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append messages in one transaction (all or none)."""
        self._pair.sync.add_many(_records(messages), **self.scope)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """See `add_messages`."""
        await self._pair.aio.add_many(_records(messages), **self.scope)

    def clear(self) -> None:
        """Forget the session's messages (other memories of the session stay)."""
        hits = self._pair.sync.scan(filters=_MESSAGES, **self.scope)
        self._pair.sync.delete_many([hit.id for hit in hits], **self.scope)

    async def aclear(self) -> None:
        """See `clear`."""
        hits = await self._pair.aio.scan(filters=_MESSAGES, **self.scope)
        await self._pair.aio.delete_many([hit.id for hit in hits], **self.scope)

    def close(self) -> None:
        """Close the memory if this history opened it."""
        if self._owns_memory:
            self._pair.sync.close()


def _records(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    records = []
    for index, message in enumerate(messages):
        if not isinstance(message, BaseMessage):
            raise InvalidInputError(
                f"messages[{index}]", "must be a LangChain message", type(message).__name__
            )
        metadata = {"kind": KIND, "role": message.type, "message": message_to_dict(message)}
        records.append({"text": _searchable_text(message), "metadata": metadata})
    return records


def _searchable_text(message: BaseMessage) -> str:
    """What the memory indexes: the message's text, or its tool calls when it has none (an
    assistant turn that only calls tools still says something worth recalling)."""
    text = message.text.strip()
    calls = getattr(message, "tool_calls", None) or []
    if calls:
        described = "; ".join(
            f"{c['name']}({json.dumps(c['args'], sort_keys=True)})" for c in calls
        )
        text = f"{text}\ntool calls: {described}" if text else f"tool calls: {described}"
    return text or f"({message.type} message without text)"


def _messages(hits: list[Hit]) -> list[BaseMessage]:
    return messages_from_dict([hit.metadata["message"] for hit in hits])
