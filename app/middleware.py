"""ASGI middleware: request ids, body limits, request logs and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from starlette.requests import ClientDisconnect

from .errors import BodyTimeout, BodyTooLarge

log = logging.getLogger("switchbank.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    """Accepts or makes an X-Request-Id, echoes it, caps the body size, logs and counts the request."""

    def __init__(self, app, settings, metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    def _limit(self, path: str) -> int:
        admin = path.startswith("/v1/admin") or path.startswith("/v2/repository")
        return self.settings.upload_limit if admin else self.settings.body_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        limit = self._limit(path)
        status = {"code": 500}
        declared = headers.get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > limit
        seen, body_done = 0, False
        deadline = time.monotonic() + self.settings.body_timeout

        async def limited_receive():
            nonlocal seen, body_done
            if body_done:  # after the body, receive() only waits for a disconnect: no deadline
                return await receive()
            # one deadline for the whole body, however it is trickled
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                raise BodyTimeout(self.settings.body_timeout) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                if not any(k.lower() == b"x-request-id" for k, _ in message["headers"]):
                    message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        t0 = time.perf_counter()
        try:
            if too_large:  # refuse before reading a byte of it
                await _send_json(send_with_id, 413, {"error": f"request body exceeds the limit of {limit} bytes",
                                                     "request_id": rid})
            else:
                await self.app(scope, limited_receive, send_with_id)
        except ClientDisconnect:
            # the client went away mid-request: nobody to answer, nothing wrong with the server
            status["code"] = 499
        finally:
            dt = time.perf_counter() - t0
            route = _route_label(path)
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(dt)
            log.info("request", extra={"request_id": rid, "method": scope.get("method"), "path": path,
                                       "status": status["code"], "duration_ms": round(dt * 1000, 2)})


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def _route_label(path: str) -> str:
    """A bounded label set for metrics: switch names are not labels."""
    if path.startswith("/v1/admin/switches/"):
        return "/v1/admin/switches/{name}"
    if path.startswith("/v2/models/"):
        tail = path.rsplit("/", 1)[-1]
        return "/v2/models/{name}/" + tail if tail in ("infer", "ready", "config") else "/v2/models/{name}"
    if path.startswith("/v2/repository/models/"):
        tail = path.rsplit("/", 1)[-1]
        return "/v2/repository/models/{name}/" + (tail if tail in ("load", "unload") else "other")
    known = ("/v1/predict/batch", "/v1/predict", "/v1/switches", "/v1/admin/switches", "/v1/admin/cache",
             "/livez", "/readyz", "/metrics", "/docs", "/openapi.json", "/v2", "/v2/health/live", "/v2/health/ready",
             "/v2/repository/index")
    return path if path in known else "other"
