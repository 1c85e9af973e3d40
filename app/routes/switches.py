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
    sizes = state.bank.manifest().switches
    served = state.engine.switches
    page, next_after = page_of(sorted(served), limit, after)
    out = []
    for name in page:
        d = describe(served[name])
        out.append(SwitchSummary(name=name, classes=d["classes"], alpha=d["alpha"], parameters=d["parameters"],
                                 bits_per_param=round(d["bits_per_param"], 4),
                                 file_bytes=sizes.get(name, {}).get("bytes", 0), queries=d["queries"]))
    return SwitchList(generation=state.engine.generation, total=len(served), switches=out, next_after=next_after)


def page_of(names: list[str], limit: int, after: str | None) -> tuple[list[str], str | None]:
    """The ``limit`` sorted ``names`` after ``after``, and the name to ask the next page after (None
    on the last page)."""
    start = bisect.bisect_right(names, after) if after is not None else 0
    page = names[start:start + limit]
    return page, page[-1] if page and start + limit < len(names) else None
