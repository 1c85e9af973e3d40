"""The server `switchbank serve` runs: what start-up loaded is frozen for the collector once ready."""

import asyncio
import gc

from fastapi import FastAPI

from app.serve import server
from app.settings import Settings


def test_ready_server_freezes_start_up_objects_and_turns_the_collector_on():
    srv = server(FastAPI(), Settings(), "127.0.0.1", 0)
    held = []

    async def run():
        task = asyncio.create_task(srv.serve())
        while not srv.started:
            assert not task.done(), "the server stopped before it started"
            await asyncio.sleep(0.01)
        held.append((gc.isenabled(), gc.get_freeze_count()))
        srv.should_exit = True
        await task

    was = gc.isenabled()
    gc.unfreeze()
    gc.disable()  # as `switchbank serve` runs it
    try:
        asyncio.run(run())
    finally:
        gc.unfreeze()
        if was:
            gc.enable()
    enabled, frozen = held[0]
    assert enabled
    assert frozen > 1000  # at least this test's modules
