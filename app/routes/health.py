"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/livez", summary="The process is up and its event loop answers")
async def livez() -> dict:
    return {"status": "alive"}


@router.get("/readyz", summary="Backbone, bank and router index are loaded and the server is not draining")
async def readyz(request: Request):
    state = request.app.state
    if not getattr(state, "ready", False):
        return JSONResponse({"status": "not ready", "reason": getattr(state, "not_ready_reason", "loading")}, 503)
    return {"status": "ready", "switches": len(state.engine.switches), "generation": state.engine.generation}


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
