"""The Open Inference Protocol's model repository extension, mapped to the bank (admin token).

The bank is both the repository and the set of loaded models: ``index`` lists every switch (and the
Auto-Switch model), ``load`` with a switch file in ``parameters["file:<any name>"]`` (base64, as
tritonclient's ``load_model(files=...)`` sends it) stores and serves it with the same checks as a
/v1/admin upload, ``load`` without a file answers whether the switch is there, and ``unload``
removes the switch from the bank.
"""

from __future__ import annotations

import base64
import binascii
import json

from fastapi import APIRouter, Depends, Request

from switchbank.bank import check_name
from switchbank.errors import NotFound

from ..errors import BadRequest
from ..schemas import ErrorResponse
from ..security import require_admin
from ..threads import run_apart
from .admin import delete_switch, store_switch
from .v2 import AUTO

router = APIRouter(prefix="/v2/repository", tags=["open inference protocol"], dependencies=[Depends(require_admin)],
                   responses={s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 408, 409, 413, 415, 422)})


async def _body(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON", 400) from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", 400)
    return body


@router.post("/index", summary="Every model in the repository (the bank's switches and the Auto-Switch model)")
async def index(request: Request) -> list[dict]:
    state = request.app.state
    body = await _body(request)
    models = [{"name": n, "version": "1", "state": "READY", "reason": ""} for n in sorted(state.engine.switches)]
    routed = len(state.engine.router) > 0
    models.insert(0, {"name": AUTO, "version": "1", "state": "READY" if routed else "UNAVAILABLE",
                      "reason": "" if routed else "no switch has query examples"})
    if body.get("ready") is True:
        models = [m for m in models if m["state"] == "READY"]
    return models


@router.post("/models/{name}/load", summary="Store and serve a switch file given in the parameters, or check it is there")
async def load(name: str, request: Request) -> dict:
    state = request.app.state
    if name == AUTO:
        return {}
    check_name(name)
    params = (await _body(request)).get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object", 400)
    files = [v for k, v in params.items() if isinstance(k, str) and k.startswith("file:")]
    if len(files) > 1:
        raise BadRequest("give one switch file (one parameters['file:...'] entry)", 400)
    if not files:
        if name not in state.engine.switches:
            raise NotFound(f"no switch named {name!r}; give its file in parameters['file:<name>'] (base64)")
        return {}
    if not isinstance(files[0], str):
        raise BadRequest("the switch file must be base64 text", 400)
    try:
        data = base64.b64decode(files[0], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("the switch file is not valid base64", 400) from None
    await run_apart(store_switch, state, data, True, name)
    return {}


@router.post("/models/{name}/unload", summary="Remove the switch from the bank")
async def unload(name: str, request: Request) -> dict:
    if name == AUTO:
        raise BadRequest(f"model {AUTO!r} is the router over every switch; unload switches instead", 400)
    await run_apart(delete_switch, request.app.state, name)
    return {}
