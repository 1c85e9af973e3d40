"""Admin routes (bearer token): upload, replace, delete, list and describe switches; cache stats."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from switchbank.bank import check_name
from switchbank.errors import InvalidInput, NotFound
from switchbank.format import describe

from ..errors import BadRequest
from ..forms import content_type, form_file, read_form
from ..schemas import ErrorResponse
from ..security import require_admin
from ..threads import run_apart
from .switches import page_of

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses={s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 408, 409, 413, 415, 422)})

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {"file": {"type": "string", "format": "binary"}}}}}}}


async def _upload_bytes(request: Request) -> bytes:
    if content_type(request) != "multipart/form-data":
        raise BadRequest("upload a switch file as multipart/form-data field 'file'", 415)
    form = await read_form(request, max_files=1, max_fields=4, max_part_size=request.app.state.settings.upload_limit)
    return await form_file(form, "file", "the switch file").read()


def store_switch(state, data: bytes, replace: bool, expect_name: str | None = None):
    """Verify and store a switch file, then serve it (blocking; run it in a thread). Returns
    (switch, changed). The same path serves /v1/admin uploads and /v2 repository loads."""
    def validate(sw):
        if expect_name is not None and sw.name != expect_name:
            raise InvalidInput(f"the file holds switch {sw.name!r}, not {expect_name!r}")
        state.engine.validate(sw)
    sw, changed = state.bank.add(data, replace=replace, validate=validate, check=state.engine.check_layout)
    state.engine.sync(state.bank)
    return sw, changed


def delete_switch(state, name: str) -> None:
    """Remove a switch from the bank and stop serving it (blocking)."""
    check_name(name)
    state.bank.remove(name)
    state.engine.sync(state.bank)


async def _store(request: Request, data: bytes, replace: bool, expect_name: str | None = None):
    state = request.app.state
    sw, changed = await run_apart(store_switch, state, data, replace, expect_name)
    body = {"name": sw.name, "content_hash": sw.content_hash, "changed": changed, "generation": state.engine.generation}
    return JSONResponse(body, status_code=201 if changed else 200)


@router.post("/switches", openapi_extra=UPLOAD_BODY, status_code=201,
             summary="Upload a switch; 409 if a different one has that name unless replace=true")
async def upload(request: Request, replace: bool = Query(False)):
    return await _store(request, await _upload_bytes(request), replace)


@router.put("/switches/{name}", openapi_extra=UPLOAD_BODY, status_code=201, summary="Create or replace the switch `name`")
async def replace_switch(name: str, request: Request):
    check_name(name)
    return await _store(request, await _upload_bytes(request), True, expect_name=name)


@router.delete("/switches/{name}", summary="Remove a switch from the bank and stop serving it")
async def delete(name: str, request: Request):
    state = request.app.state
    await run_apart(delete_switch, state, name)
    return {"name": name, "deleted": True, "generation": state.engine.generation}


def _describe(state, name: str) -> dict:
    sw = state.engine.switches.get(name)
    if sw is None:
        raise NotFound(f"no switch named {name!r}")
    return describe(sw, state.bank.manifest().switches.get(name, {}).get("bytes"))


@router.get("/switches", summary="The served switches, described in full, a page at a time")
async def list_switches(request: Request, limit: int = Query(100, ge=1, le=1000, description="switches per page"),
                        after: str | None = Query(None, max_length=64, description="the last name of the previous page")):
    state = request.app.state
    served = state.engine.switches
    page, next_after = page_of(sorted(served), limit, after)
    sizes = state.bank.manifest().switches
    return {"generation": state.engine.generation, "total": len(served),
            "switches": [describe(served[n], sizes.get(n, {}).get("bytes")) for n in page],
            "next_after": next_after}


@router.get("/switches/{name}", summary="One switch, described in full")
async def describe_switch(name: str, request: Request):
    return _describe(request.app.state, name)


@router.get("/cache", summary="Delta cache, resident switches, router and engine statistics")
async def cache_stats(request: Request):
    engine = request.app.state.engine
    per_switch = engine.resident.per_switch()
    blank = {"resident_bytes": 0, "pinned": False, "in_use": False, "recency": 0}
    for key in engine.cache.keys():
        for name in key.names:
            entry = per_switch.setdefault(name, dict(blank))
            entry["cached_combinations"] = entry.get("cached_combinations", 0) + 1
    for name, nbytes in engine.heads.per_switch().items():
        per_switch.setdefault(name, dict(blank))["head_bytes"] = nbytes
    return {**asdict(engine.cache.stats()), "engine": asdict(engine.stats()),
            "resident": asdict(engine.resident.stats()), "heads": asdict(engine.heads.stats()),
            "router": engine.router.stats(),
            "switches": dict(sorted(per_switch.items()))}
