"""Configuration at the boundary: environment (prefix `MEMLAYER_`), byte sizes, data dir,
input limits.

Part of the ground. Pydantic validates what users give; subsystems receive plain values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from memlayer.errors import InvalidInputError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str, field: str = "size") -> int:
    """Parse a byte size: an int, or a string with a unit ("512MiB", "8GiB", "1.5 GB")."""
    if isinstance(value, bool):
        raise InvalidInputError(field, "must be a byte count or a size such as '8GiB'", value)
    if isinstance(value, (int, float)):
        if value < 0:
            raise InvalidInputError(field, "must not be negative", value)
        return int(value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise InvalidInputError(
        field, "must be a byte count or a size with a unit (B, KB, MB, GB, KiB, MiB, GiB)", value
    )


ByteSize = Annotated[int, BeforeValidator(parse_bytes)]


def default_data_dir() -> Path:
    """The per-user data folder memlayer uses when no path is given."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("memlayer", appauthor=False))


@dataclass(frozen=True)
class DatabaseOptions:
    """How the records database is used: connection pool size (PostgreSQL), a server-side
    timeout per statement (PostgreSQL; None: the server's), how long a write is retried
    after a lost connection or a rolled-back transaction (PostgreSQL), and whether opening
    applies missing schema revisions (False: refuse a database that is behind, for
    deployments that run `memlayer db upgrade` separately)."""

    pool_size: int = 5
    statement_timeout_s: float | None = 30.0
    retry_s: float = 30.0
    migrate: bool = True


class Settings(BaseSettings):
    """Process-wide defaults, read from `MEMLAYER_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="MEMLAYER_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)  # MEMLAYER_DATA_DIR
    url: str | None = None  # MEMLAYER_URL: a database URL used when no path or url is given
    embedder: str | None = None  # MEMLAYER_EMBEDDER: a name or folder used when none is given
    db_pool_size: int = Field(default=5, ge=1)  # MEMLAYER_DB_POOL_SIZE
    db_statement_timeout_s: float | None = Field(default=30.0, gt=0)  # ..._STATEMENT_TIMEOUT_S
    db_retry_s: float = Field(default=30.0, ge=0)  # MEMLAYER_DB_RETRY_S
    db_migrate: bool = True  # MEMLAYER_DB_MIGRATE
    # MEMLAYER_PG_FILTER_KEYS: metadata keys given filter indexes on PostgreSQL, comma-separated
    # (`IndexConfig.pg_filter_keys` of a Memory opened without an index_config, as `serve`'s)
    pg_filter_keys: str = ""

    def filter_keys(self) -> tuple[str, ...]:
        """`pg_filter_keys` as a tuple of the keys named, blanks dropped."""
        return tuple(key.strip() for key in self.pg_filter_keys.split(",") if key.strip())

    def database(self) -> DatabaseOptions:
        """The database options these settings name."""
        return DatabaseOptions(
            pool_size=self.db_pool_size,
            statement_timeout_s=self.db_statement_timeout_s,
            retry_s=self.db_retry_s,
            migrate=self.db_migrate,
        )


@dataclass(frozen=True)
class Limits:
    """Caps on what one call may store or ask; larger input is refused with
    `InvalidInputError` naming the field and the cap, and nothing is stored."""

    max_text_chars: int = 100_000  # one record's text, and one query
    max_metadata_bytes: int = 64 * 1024  # a record's metadata, encoded as JSON
    max_metadata_depth: int = 16  # nesting of dicts and lists in metadata
    max_batch: int = 10_000  # items in one add_many call

    def __post_init__(self) -> None:
        for name in ("max_text_chars", "max_metadata_bytes", "max_metadata_depth", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(name, "must be an integer >= 1", value)
