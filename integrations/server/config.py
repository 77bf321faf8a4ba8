"""The service's settings, read from `MEMLAYER_SERVER_*` environment variables (and the admin
token from `MEMLAYER_ADMIN_TOKEN`), so every worker process of `memlayer serve` gets the same."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """Limits and credentials of one service process.

    The database and the embedder are `Memory`'s own settings (`MEMLAYER_URL` or
    `MEMLAYER_DATA_DIR`, `MEMLAYER_EMBEDDER`), so the service opens what `Memory()` opens.
    """

    model_config = SettingsConfigDict(
        env_prefix="MEMLAYER_SERVER_", extra="ignore", populate_by_name=True
    )

    admin_token: str | None = Field(default=None, validation_alias="MEMLAYER_ADMIN_TOKEN")
    max_body_bytes: int = Field(default=4 * 2**20, ge=1024)  # one request's body
    rate_per_s: float = Field(default=100.0, ge=0)  # per API key and process; 0: no limit
    rate_burst: int = Field(default=200, ge=1)  # requests a key may make at once
    timeout_s: float = Field(default=30.0, gt=0)  # one request's work, then 503
    max_page: int = Field(default=1000, ge=1)  # most items one list, search or batch holds
    # threads running the blocking work (database, embedder) of one process's requests
    threads: int = Field(default=8, ge=1)
    # threads of the numeric libraries (torch, BLAS, OpenMP) in a `memlayer serve` worker:
    # one request's embedding or search on one, requests in parallel across the pool and the
    # workers (a thread team of one request waits for cores other requests hold)
    compute_threads: int = Field(default=1, ge=1)
    # seconds a process trusts an API key it looked up: a key revoked through another
    # process (or host) stops working there within this time; in the revoking process at once.
    # 0: look every key up in the database on every request
    key_cache_s: float = Field(default=5.0, ge=0)
