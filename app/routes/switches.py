"""GET /v1/switches: the public list of served switches."""

from __future__ import annotations

from fastapi import APIRouter, Request

from switchbank.format import describe

from ..schemas import SwitchList, SwitchSummary

router = APIRouter(prefix="/v1", tags=["switches"])


@router.get("/switches", response_model=SwitchList, summary="The switches this server routes to")
async def switches(request: Request) -> SwitchList:
    state = request.app.state
    sizes = {n: i["bytes"] for n, i in state.bank.manifest().switches.items()}
    out = []
    for name, sw in sorted(state.engine.switches.items()):
        d = describe(sw)
        out.append(SwitchSummary(name=name, classes=d["classes"], alpha=d["alpha"], parameters=d["parameters"],
                                 bits_per_param=round(d["bits_per_param"], 4), file_bytes=sizes.get(name, 0),
                                 queries=d["queries"]))
    return SwitchList(generation=state.engine.generation, switches=out)
