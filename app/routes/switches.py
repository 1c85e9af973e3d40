"""GET /v1/switches: the public list of served switches."""

from __future__ import annotations

import bisect

from fastapi import APIRouter, Query, Request

from switchbank.format import describe

from ..schemas import SwitchList, SwitchSummary

router = APIRouter(prefix="/v1", tags=["switches"])


@router.get("/switches", response_model=SwitchList, summary="The switches this server routes to, a page at a time")
async def switches(request: Request, limit: int = Query(100, ge=1, le=1000, description="switches per page"),
                   after: str | None = Query(None, max_length=64, description="the last name of the previous page")
                   ) -> SwitchList:
    state = request.app.state
    sizes = {n: i["bytes"] for n, i in state.bank.manifest().switches.items()}
    names = sorted(state.engine.switches)
    start = bisect.bisect_right(names, after) if after is not None else 0
    page = names[start:start + limit]
    served = state.engine.switches
    out = []
    for name, sw in ((n, served[n]) for n in page if n in served):
        d = describe(sw)
        out.append(SwitchSummary(name=name, classes=d["classes"], alpha=d["alpha"], parameters=d["parameters"],
                                 bits_per_param=round(d["bits_per_param"], 4), file_bytes=sizes.get(name, 0),
                                 queries=d["queries"]))
    more = start + limit < len(names)
    return SwitchList(generation=state.engine.generation, total=len(names), switches=out,
                      next_after=page[-1] if more and page else None)
