"""Tenants, their API keys and the chat sessions of their users, in tables of the memories'
own database (SQLite or PostgreSQL), so every worker on every host reads the same.

An API key is shown once when created and stored only as its SHA-256 hash: the keys are 256
random bits, so a fast hash is enough (no password stretching needed) and a lookup is one
indexed read.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url

from memlayer import InvalidInputError, NotFoundError

_meta = MetaData()
tenants = Table(
    "memlayer_tenants",
    _meta,
    Column("tenant_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
)
api_keys = Table(
    "memlayer_api_keys",
    _meta,
    Column("key_id", String(32), primary_key=True),
    Column("tenant_id", String(64), ForeignKey(tenants.c.tenant_id), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)
sessions = Table(
    "memlayer_sessions",
    _meta,
    Column("tenant_id", String(64), primary_key=True),
    Column("user_id", String(256), primary_key=True),
    Column("session_id", String(256), primary_key=True),
    Column("created_at", Float, nullable=False),
    Index("memlayer_sessions_by_user", "tenant_id", "user_id", "created_at"),
)
TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY_PREFIX = "mlk_"


@dataclass(frozen=True)
class Caller:
    """Who a data request acts for: the tenant its key belongs to, and the key."""

    tenant_id: str
    key_id: str


def hash_key(api_key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


class TenantStore:
    """Tenants, keys and sessions; every method is one short transaction."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            self.engine: Engine = create_engine(
                parsed, connect_args={"check_same_thread": False, "timeout": 30}
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(parsed, pool_pre_ping=True, pool_size=2, max_overflow=8)
        self._create_tables()

    def _create_tables(self) -> None:
        # two workers starting on one empty PostgreSQL race on CREATE TABLE; the loser retries
        for attempt in range(5):
            try:
                _meta.create_all(self.engine)
                return
            except Exception:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def ping(self) -> None:
        """Raise when the database cannot be read."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        """Return the connections."""
        self.engine.dispose()

    # -- tenants ----------------------------------------------------------------------------

    def create_tenant(self, name: str | None, tenant_id: str | None) -> dict[str, Any]:
        """A new tenant (its id given, or random); InvalidInputError when the id is taken."""
        tenant_id = tenant_id or f"t_{secrets.token_hex(8)}"
        if not TENANT_ID.match(tenant_id):
            raise InvalidInputError(
                "tenant_id", "must be 1-64 letters, digits, '_', '.', '-' (not first)"
            )
        row = {"tenant_id": tenant_id, "name": name or tenant_id, "created_at": time.time()}
        with self.engine.begin() as conn:
            if conn.execute(select(tenants.c.tenant_id).where(_is_tenant(tenant_id))).first():
                raise InvalidInputError("tenant_id", "is taken by another tenant", tenant_id)
            conn.execute(tenants.insert().values(**row))
        return row

    def tenant(self, tenant_id: str) -> dict[str, Any]:
        """One tenant, or NotFoundError."""
        with self.engine.connect() as conn:
            row = conn.execute(select(tenants).where(_is_tenant(tenant_id))).mappings().first()
        if row is None:
            raise NotFoundError("tenant", tenant_id)
        return dict(row)

    def list_tenants(self, offset: int, limit: int) -> list[dict[str, Any]]:
        """Tenants, oldest first."""
        query = select(tenants).order_by(tenants.c.created_at, tenants.c.tenant_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query.offset(offset).limit(limit)).mappings()
            return [dict(row) for row in rows]

    # -- keys -------------------------------------------------------------------------------

    def create_key(self, tenant_id: str, name: str | None) -> dict[str, Any]:
        """A new API key of the tenant: the returned `api_key` is its only plain copy."""
        self.tenant(tenant_id)
        key_id = secrets.token_hex(8)
        api_key = f"{_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        row = {
            "key_id": key_id,
            "tenant_id": tenant_id,
            "key_hash": hash_key(api_key),
            "name": name or key_id,
            "created_at": time.time(),
            "revoked_at": None,
        }
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(**row))
        return {**_public_key(row), "api_key": api_key}

    def list_keys(self, tenant_id: str) -> list[dict[str, Any]]:
        """The tenant's keys (never their secrets), oldest first."""
        self.tenant(tenant_id)
        query = select(api_keys).where(api_keys.c.tenant_id == tenant_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(api_keys.c.created_at)).mappings()
            return [_public_key(dict(row)) for row in rows]

    def revoke_key(self, tenant_id: str, key_id: str) -> dict[str, Any]:
        """Revoke a key of the tenant (from the next request on, in every worker)."""
        mine = (api_keys.c.tenant_id == tenant_id) & (api_keys.c.key_id == key_id)
        with self.engine.begin() as conn:
            row = conn.execute(select(api_keys).where(mine)).mappings().first()
            if row is None:
                raise NotFoundError("key", key_id)
            revoked = dict(row)
            if revoked["revoked_at"] is None:
                revoked["revoked_at"] = time.time()
                conn.execute(api_keys.update().where(mine).values(revoked_at=revoked["revoked_at"]))
        return _public_key(revoked)

    def caller(self, api_key: str) -> Caller | None:
        """The tenant and key an API key stands for, or None (unknown or revoked)."""
        return self.caller_by_hash(hash_key(api_key))

    def caller_by_hash(self, digest: str) -> Caller | None:
        """`caller` of the key whose hash is `digest`."""
        query = select(api_keys.c.tenant_id, api_keys.c.key_id).where(
            (api_keys.c.key_hash == digest) & api_keys.c.revoked_at.is_(None)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return Caller(tenant_id=row[0], key_id=row[1]) if row else None

    # -- sessions ---------------------------------------------------------------------------

    def open_session(self, tenant_id: str, user_id: str, session_id: str) -> dict[str, Any]:
        """The session, created when it does not exist yet (a read when it does)."""
        found = self.session(tenant_id, user_id, session_id)
        if found is not None:
            return found
        row = {
            "tenant_id": tenant_id,
            "user_id": user_id,
            "session_id": session_id,
            "created_at": time.time(),
        }
        insert = _insert_ignoring_duplicates(self.engine.dialect.name)
        with self.engine.begin() as conn:
            conn.execute(insert.values(**row))
        return self.session(tenant_id, user_id, session_id) or row

    def session(self, tenant_id: str, user_id: str, session_id: str) -> dict[str, Any] | None:
        """One session of the user, or None."""
        query = select(sessions).where(
            _is_user(tenant_id, user_id) & (sessions.c.session_id == session_id)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _public_session(dict(row)) if row else None

    def list_sessions(
        self, tenant_id: str, user_id: str, offset: int, limit: int
    ) -> list[dict[str, Any]]:
        """The user's sessions, oldest first."""
        query = (
            select(sessions)
            .where(_is_user(tenant_id, user_id))
            .order_by(sessions.c.created_at, sessions.c.session_id)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query.offset(offset).limit(limit)).mappings()
            return [_public_session(dict(row)) for row in rows]

    def list_users(self, tenant_id: str, offset: int, limit: int) -> list[str]:
        """The tenant's users that have sessions, in id order."""
        query = (
            select(sessions.c.user_id)
            .where(sessions.c.tenant_id == tenant_id)
            .group_by(sessions.c.user_id)
            .order_by(sessions.c.user_id)
        )
        with self.engine.connect() as conn:
            return [row[0] for row in conn.execute(query.offset(offset).limit(limit))]

    def delete_sessions(self, tenant_id: str, user_id: str, session_id: str | None = None) -> int:
        """Forget one session of the user, or all of them; returns how many."""
        where = _is_user(tenant_id, user_id)
        if session_id is not None:
            where = where & (sessions.c.session_id == session_id)
        with self.engine.begin() as conn:
            return int(conn.execute(sessions.delete().where(where)).rowcount or 0)


def _is_tenant(tenant_id: str) -> Any:
    return tenants.c.tenant_id == tenant_id


def _is_user(tenant_id: str, user_id: str) -> Any:
    return (sessions.c.tenant_id == tenant_id) & (sessions.c.user_id == user_id)


def _public_key(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "key_hash"}


def _public_session(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "tenant_id"}


def _insert_ignoring_duplicates(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(sessions).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(sessions).on_conflict_do_nothing()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """As memlayer's own SQLite connections: WAL, and a commit survives `kill -9`."""
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
