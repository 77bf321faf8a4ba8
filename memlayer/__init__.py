"""memlayer: retrieval and memory for agents and streaming inputs.

`import memlayer` is light: the public classes load their subsystems on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from memlayer.errors import (
    AuthenticationError,
    CapacityError,
    ClosedError,
    CorruptionError,
    InvalidInputError,
    MemlayerError,
    MissingExtraError,
    ModelMismatchError,
    NotFoundError,
    StorageError,
    UnsupportedModelError,
)
from memlayer.types import Hit, Page, Scope

__version__ = "0.2.0"

_LAZY = {
    "Context": "memlayer.context",
    "CragContext": "memlayer.context",
    "Memory": "memlayer.memory",
    "AsyncMemory": "memlayer.async_memory",
    "KVSession": "memlayer.kv_session",
    "KVContext": "memlayer.kv_context",
    "VideoSession": "memlayer.video_session",
    "VideoAnswer": "memlayer.video_session",
    "Limits": "memlayer.config",
    "DatabaseOptions": "memlayer.config",
    "RemoteMemory": "memlayer.remote",
    "AsyncRemoteMemory": "memlayer.remote",
}

if TYPE_CHECKING:
    from memlayer.async_memory import AsyncMemory
    from memlayer.config import DatabaseOptions, Limits
    from memlayer.context import Context, CragContext
    from memlayer.kv_context import KVContext
    from memlayer.kv_session import KVSession
    from memlayer.memory import Memory
    from memlayer.remote import AsyncRemoteMemory, RemoteMemory
    from memlayer.video_session import VideoAnswer, VideoSession


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'memlayer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AsyncMemory",
    "AsyncRemoteMemory",
    "AuthenticationError",
    "CapacityError",
    "ClosedError",
    "Context",
    "CorruptionError",
    "CragContext",
    "DatabaseOptions",
    "Hit",
    "InvalidInputError",
    "KVContext",
    "KVSession",
    "Limits",
    "MemlayerError",
    "Memory",
    "MissingExtraError",
    "ModelMismatchError",
    "NotFoundError",
    "Page",
    "RemoteMemory",
    "Scope",
    "StorageError",
    "UnsupportedModelError",
    "VideoAnswer",
    "VideoSession",
    "__version__",
]
