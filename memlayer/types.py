"""Core value types shared by every subsystem: `Scope`, `Page`, `Hit`.

Part of the ground: imports nothing else of memlayer but `errors`, and nothing heavy.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from memlayer.errors import InvalidInputError

SCOPE_FIELDS = ("tenant_id", "user_id", "agent_id", "session_id")
_MAX_SCOPE_LEN = 256


@dataclass(frozen=True)
class Scope:
    """Who owns a record or page, and what a call may see.

    `tenant_id` picks the tenant (None: the default tenant); a call never sees another
    tenant's records. Within the tenant, each other field that is set narrows the call to
    records with that value, and an unset field matches anything.
    """

    tenant_id: str | None = None
    user_id: str | None = None
    agent_id: str | None = None
    session_id: str | None = None

    def __post_init__(self) -> None:
        for name in SCOPE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not value or len(value) > _MAX_SCOPE_LEN:
                raise InvalidInputError(
                    name,
                    f"must be a non-empty string of at most {_MAX_SCOPE_LEN} characters",
                    value,
                )
            check_unicode(value, name)

    @classmethod
    def of(cls, scope: Mapping[str, Any]) -> Scope:
        """Build a Scope from keyword arguments, rejecting unknown names."""
        unknown = set(scope) - set(SCOPE_FIELDS)
        if unknown:
            raise InvalidInputError(
                sorted(unknown)[0], f"unknown scope field; allowed: {', '.join(SCOPE_FIELDS)}"
            )
        return cls(**{k: v for k, v in scope.items() if v is not None})

    def as_dict(self) -> dict[str, str]:
        """The set fields only."""
        return {k: v for k in SCOPE_FIELDS if (v := getattr(self, k)) is not None}


def check_unicode(text: str, field: str) -> str:
    """`text`, or InvalidInputError when it cannot be stored as UTF-8 (a lone surrogate, which
    JSON's `\\ud800` escapes can carry in from a client)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            field, f"must be valid Unicode (a lone surrogate at position {exc.start})"
        ) from exc
    return text


def new_id() -> str:
    """A fresh, globally unique, URL-safe id."""
    return uuid.uuid4().hex


PageKind = Literal["semantic", "kv"]


@dataclass
class Page:
    """A sealed, immutable span of one stream, owned by a scope.

    `payload` is a dict of named tensors (per-layer keys/values, summaries) or raw bytes;
    dtypes and shapes are preserved exactly through every tier.
    """

    id: str
    payload: Mapping[str, Any] | bytes
    kind: PageKind = "kv"
    scope: Scope = field(default_factory=Scope)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        """Bytes of payload (tensor storage or raw bytes)."""
        if isinstance(self.payload, (bytes, bytearray, memoryview)):
            return len(self.payload)
        total = 0
        for value in self.payload.values():
            numel = getattr(value, "numel", None)
            if numel is not None:
                total += int(numel()) * int(value.element_size())
            elif isinstance(value, (bytes, bytearray, memoryview)):
                total += len(value)
        return total


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: str
    text: str
    score: float
    metadata: dict[str, Any]
    scope: Scope
    created_at: float
    updated_at: float
