"""The error hierarchy: every failure memlayer reports is a `MemlayerError`.

Messages name the field and the rule that was broken, so a caller can fix the input
without reading our source. Part of the ground: imports nothing else of memlayer.
"""

from __future__ import annotations


class MemlayerError(Exception):
    """Base class of every error memlayer raises on purpose."""


class InvalidInputError(MemlayerError, ValueError):
    """An argument broke a rule; nothing was changed.

    `field` names the offending argument and `rule` says what it must satisfy.
    """

    def __init__(self, field: str, rule: str, got: object = None) -> None:
        self.field = field
        self.rule = rule
        self.got = got
        shown = "" if got is None else f" (got {_short(got)})"
        super().__init__(f"{field}: {rule}{shown}")


class NotFoundError(MemlayerError, KeyError):
    """An id (record, page, session) that is not stored."""

    def __init__(self, what: str, key: object) -> None:
        self.what = what
        self.key = key
        super().__init__(f"{what} {key!r} not found")

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class ClosedError(MemlayerError, RuntimeError):
    """An operation on an object after `close()`."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is closed; open a new one")


class AuthenticationError(MemlayerError, PermissionError):
    """The memory service refused the API key: missing, unknown or revoked."""


class CapacityError(MemlayerError):
    """Something does not fit a configured budget (bytes, tokens, pages)."""


class StorageError(MemlayerError, OSError):
    """The storage below failed (disk full, permissions, I/O); nothing acknowledged was lost."""


class CorruptionError(StorageError):
    """Stored bytes failed their checksum or framing; they are never returned as data."""


class MissingExtraError(MemlayerError, ImportError):
    """A dependency is not installed; the message says what to install: the pip extra that
    brings it, or `install`, the exact command when no extra does."""

    def __init__(self, module: str, extra: str | None = None, *, install: str | None = None):
        self.module = module
        self.extra = extra
        command = install or f"pip install 'memlayer[{extra}]'"
        super().__init__(f"{module} is required for this feature: {command}")


class UnsupportedModelError(MemlayerError):
    """A model that memlayer cannot hook (its attention bypasses transformers' interfaces)."""


class ModelMismatchError(MemlayerError):
    """Saved state belongs to a different model than the one given (fingerprint differs)."""


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
