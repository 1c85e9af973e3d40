"""Mapping domain errors to HTTP answers, in one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from switchbank.errors import (CheckpointError, Conflict, CorruptSwitch, Incompatible, InvalidInput, NotFound,
                               Unavailable,
                               SwitchBankError)

log = logging.getLogger("switchbank.app")


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        self.limit = limit


class BodyTimeout(Exception):
    def __init__(self, seconds: float):
        self.seconds = seconds


class Overloaded(Exception):
    """The request queue is full, or a request waited too long."""


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 422):
        self.message, self.status = message, status


STATUS = [
    (NotFound, 404), (Conflict, 409), (InvalidInput, 422), (Incompatible, 422), (Unavailable, 503),
    (CorruptSwitch, 422), (CheckpointError, 422), (SwitchBankError, 400),
]


def validation_message(exc, prefix: str = "") -> str:
    """A pydantic ValidationError as one line: each field's location and what was wrong with it."""
    parts = []
    for e in exc.errors():
        loc = ".".join(map(str, e["loc"]))
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{prefix}{loc}: {msg}" if loc else f"{prefix}{msg}")
    return "; ".join(parts)


def status_of(exc: SwitchBankError) -> int:
    return next(code for cls, code in STATUS if isinstance(exc, cls))


def _answer(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    rid = getattr(request.state, "request_id", None)
    if rid:  # also set here: a 500 is sent from outside the middleware that adds it otherwise
        headers = {**(headers or {}), "X-Request-Id": rid}
    return JSONResponse({"error": message, "request_id": rid}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(SwitchBankError)
    async def _domain(request: Request, exc: SwitchBankError):
        return _answer(request, status_of(exc), str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; GET and POST on one path
            # are separate routes here, so gather them all.
            methods = {m for r in request.app.routes if getattr(r, "path_regex", None) and r.path_regex.match(request.url.path)
                       for m in (getattr(r, "methods", None) or ())}
            headers = {**(headers or {}), "Allow": ", ".join(sorted(methods))}
        return _answer(request, exc.status_code, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _answer(request, 422, "; ".join(parts) or "invalid request")

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return _answer(request, exc.status, exc.message)

    @app.exception_handler(BodyTooLarge)
    async def _large(request: Request, exc: BodyTooLarge):
        return _answer(request, 413, f"request body exceeds the limit of {exc.limit} bytes")

    @app.exception_handler(BodyTimeout)
    async def _slow(request: Request, exc: BodyTimeout):
        return _answer(request, 408, f"request body not received within {exc.seconds:g} s")

    @app.exception_handler(Overloaded)
    async def _busy(request: Request, exc: Overloaded):
        return _answer(request, 503, str(exc) or "server is overloaded; retry shortly", {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error", extra={"request_id": getattr(request.state, "request_id", None)})
        return _answer(request, 500, "internal server error")
