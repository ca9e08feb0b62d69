"""One place maps failures to status codes and ``{"error", "detail"}`` bodies."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bigtent.errors import (
    AuthError,
    BigtentError,
    RangeNotSatisfiable,
    TooManyAuthFailures,
    clipped,
)
from bigtent.runner.db.migrate import DATABASE_ERRORS, database_unavailable
from bigtent.runner.venues.sessions import bearer_token

log = logging.getLogger(__name__)


def error_response(exc: BigtentError) -> JSONResponse:
    """The one rendering of a failure: ``{"error", "detail"}`` with the error's status (a 401
    also names the scheme, RFC 9110). Messages never contain the credential."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    if isinstance(exc, TooManyAuthFailures):
        headers = {"Retry-After": str(exc.retry_after_secs)}
    if isinstance(exc, RangeNotSatisfiable):
        headers = {"Content-Range": f"bytes */{exc.size}"}
    if exc.http_status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_SECS)}
    body = {"error": clipped(exc.message), "detail": clipped(exc.detail)}
    return JSONResponse(body, status_code=exc.http_status, headers=headers)


RETRY_AFTER_SECS = 2
"""What a 503 (the database or storage cannot be used now) tells clients to wait."""


MAX_SHOWN_ERRORS = 20
"""Validation errors listed in an answer (a list of a million bad items has as many)."""


def failure_response(request: Request, exc: Exception) -> JSONResponse | None:
    """The answer to a failure of a route: its rendering for a ``BigtentError`` (a refused
    credential also counted) or an outage of the database (503); None for anything else,
    a bug, which must propagate (a server error)."""
    if isinstance(exc, BigtentError):
        if isinstance(exc, AuthError):  # refused by a route (the gate counts its own)
            credential = bearer_token(request.headers.get("authorization"))
            request.app.state.components.metrics.auth_failed(exc, credential)
        return error_response(exc)
    if isinstance(exc, DATABASE_ERRORS):
        failure = database_unavailable(exc)
        if failure is None:
            return None
        log.warning("%s %s: %s", request.method, request.url.path, failure)
        return error_response(failure)
    return None


def install_error_handlers(app: FastAPI) -> None:
    """One place maps failures to status codes and ``{"error", "detail"}`` bodies."""

    async def _failure(request: Request, exc: Exception) -> JSONResponse:
        response = failure_response(request, exc)
        if response is None:
            raise exc  # a bug, not an outage: the server error it is
        return response

    app.add_exception_handler(BigtentError, _failure)
    for database_error in DATABASE_ERRORS:
        app.add_exception_handler(database_error, _failure)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Never the input itself; a location or message quoting it (a dict key) is clipped.
        errors = [
            {"loc": clipped(list(e.get("loc", ()))), "msg": clipped(e.get("msg", ""))}
            for e in exc.errors()[:MAX_SHOWN_ERRORS]
        ]
        return JSONResponse({"error": "invalid request", "detail": errors}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"error": clipped(str(exc.detail)), "detail": None}
        return JSONResponse(body, status_code=exc.status_code)
