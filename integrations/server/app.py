"""The app factory: routes, error bodies, limits and metrics around one `Memory`.

`create_app(memory)` serves an open `Memory` (tests, embedding the service in another app);
`app_from_env()` opens the one `Memory()` opens from the environment, as each worker of
`memlayer serve` does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from memlayer import Memory, __version__
from memlayer.integrations.server import admin, chat, errors, memories
from memlayer.integrations.server.compute import limit_compute_threads
from memlayer.integrations.server.config import ServerSettings
from memlayer.integrations.server.limits import BodyLimit, RateLimiter, rule_of
from memlayer.integrations.server.metrics import MeasureRequests, Metrics
from memlayer.integrations.server.schemas import ErrorOut, StatusOut
from memlayer.integrations.server.service import Service, Svc
from memlayer.integrations.server.tenants import TenantStore

_ERRORS = {
    status: {"model": ErrorOut, "description": text}
    for status, text in {
        401: "no API key, or an unknown or revoked one",
        404: "not in the caller's scope",
        413: "the body is too large",
        422: "bad input: `field` names it",
        429: "over the key's rate",
    }.items()
}
_DESCRIPTION = """Long chat memory for many tenants over memlayer's `Memory`.

Send `Authorization: Bearer <api key>` on every `/v1` call; the key decides the tenant.
Errors are `{"error": {"code", "message", "field"}}`. Limits: {limits}."""


def create_app(
    memory: Memory | None = None,
    settings: ServerSettings | None = None,
    *,
    close_memory: bool | None = None,
    limit_threads: bool = False,
) -> FastAPI:
    """The service over `memory` (None: `Memory()` from the environment, opened at startup).

    The memory is closed at shutdown when the app opened it, or when `close_memory` says so.
    `limit_threads` puts the process's numeric libraries on `settings.compute_threads`
    threads (what a `memlayer serve` worker does; an app embedding the service keeps its own).
    """
    settings = settings or ServerSettings()
    owns = memory is None if close_memory is None else close_memory
    if limit_threads:  # before the embedder and FAISS load their OpenMP runtimes
        limit_compute_threads(settings.compute_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        opened = memory if memory is not None else Memory()
        if limit_threads:  # again, now that the embedder's libraries are loaded
            limit_compute_threads(settings.compute_threads)
        tenants = TenantStore(opened.url)
        limiter = RateLimiter(settings.rate_per_s, settings.rate_burst)
        app.state.service = service = Service(opened, tenants, settings, limiter)
        try:
            yield
        finally:
            service.close()
            tenants.close()
            if owns:
                opened.close()

    app = FastAPI(
        title="memlayer",
        version=__version__,
        description=_DESCRIPTION.replace("{limits}", rule_of(settings)),
        lifespan=lifespan,
        responses=_ERRORS,  # type: ignore[arg-type]
    )
    errors.install(app)
    for router in (admin.router, memories.router, chat.router):
        app.include_router(router)
    _health(app)
    metrics = Metrics()
    app.add_route("/metrics", metrics.render, include_in_schema=False)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MeasureRequests, metrics=metrics)
    return app


def _health(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"], response_model=StatusOut)
    async def healthz() -> StatusOut:
        """The process is up."""
        return StatusOut(status="ok")

    @app.get("/readyz", tags=["health"], response_model=StatusOut)
    async def readyz(request: Request, svc: Svc) -> StatusOut | JSONResponse:
        """The process can read its database (503 while it cannot)."""
        try:
            await svc.call(svc.tenants.ping)
            await svc.call(svc.memory.count, tenant_id="memlayer-readiness")
        except Exception as exc:
            return errors.error_response(503, "unavailable", f"database not ready: {exc}")
        return StatusOut(status="ready")


def openapi_document() -> dict[str, Any]:
    """The service's OpenAPI schema with default settings (committed as docs/openapi.json)."""
    return create_app(settings=ServerSettings.model_construct()).openapi()


def app_from_env() -> FastAPI:
    """The app `memlayer serve` runs in each worker (a uvicorn factory)."""
    return create_app(limit_threads=True)
