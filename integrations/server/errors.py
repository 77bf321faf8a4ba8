"""Every error the service answers is JSON `{"error": {"code", "message", "field"}}`: bad
input is a 4xx naming the field; only a failure of the service itself is a 5xx."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException

from memlayer import (
    AuthenticationError,
    CapacityError,
    ClosedError,
    InvalidInputError,
    MemlayerError,
    ModelMismatchError,
    NotFoundError,
    StorageError,
)

log = logging.getLogger("memlayer.server")

# MemlayerError subclass -> (HTTP status, code); the first match wins, so subclasses first
_CORE = (
    (InvalidInputError, 422, "invalid_input"),
    (NotFoundError, 404, "not_found"),
    (AuthenticationError, 401, "unauthorized"),
    (CapacityError, 413, "capacity"),
    (ModelMismatchError, 409, "model_mismatch"),
    (ClosedError, 503, "unavailable"),
    (StorageError, 503, "storage"),
)
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


class ApiError(Exception):
    """An answer other than success, raised anywhere in a request."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The JSON error body every failure uses."""
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


def _core_error(_: Request, exc: Exception) -> JSONResponse:
    for kind, status, code in _CORE:
        if isinstance(exc, kind):
            if status >= 500:
                log.warning("service failure: %s", exc)
            field = exc.field if isinstance(exc, InvalidInputError) else None
            return error_response(status, code, str(exc), field)
    return error_response(400, "rejected", str(exc))


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    where = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    field = ".".join(where) or None
    message = str(first.get("msg", "invalid request"))
    return error_response(422, "invalid_input", f"{field}: {message}" if field else message, field)


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    field = "body" if exc.status_code == 413 else None
    return error_response(exc.status_code, code, str(exc.detail), field, exc.headers)


def _database_error(_: Request, exc: Exception) -> JSONResponse:
    """The service's own tables (tenants, keys, sessions) failed in the driver: the same
    answer as a failing memory store, without the SQL."""
    log.warning("database failure: %s", exc)
    return error_response(503, "storage", "the database failed; the error is logged")


def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected failure", exc_info=exc)
    return error_response(500, "internal", "the service failed; the error is logged")


def install(app: FastAPI) -> None:
    """Answer every kind of failure with the JSON error body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(MemlayerError, _core_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unexpected)
