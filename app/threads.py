"""The server's threads for torch work.

torch's OpenMP (GNU's, in the wheels) keeps a team of worker threads for every thread that runs a
parallel operation, for as long as that thread lives. While there are no more OpenMP threads than
cores an idle worker spins, ready for the next operation; with more, GNU OpenMP puts it to sleep
at once, and every small operation of a forward then pays for waking it (the demo tower's batches
of one took about 40% longer). So the engine is imported, loaded and run on one thread, and other
torch work runs on threads that end with it.
"""

from __future__ import annotations

import asyncio
import importlib
from concurrent.futures import ThreadPoolExecutor

from switchbank.priority import lower_this_thread


def engine_thread(*modules: str) -> ThreadPoolExecutor:
    """The single thread that loads and runs the engine, with torch and ``modules`` imported on it:
    importing torch, and switchbank.onednn (whose probes run as it loads), starts a team
    for the importing thread."""
    engine = ThreadPoolExecutor(1, thread_name_prefix="switchbank-engine")
    import_on(engine, "torch", *modules)
    return engine


def import_on(engine: ThreadPoolExecutor, *modules: str) -> None:
    for name in modules:
        engine.submit(importlib.import_module, name).result()


async def run_apart(fn, *args):
    """``fn(*args)`` on a thread of its own that ends with it, for torch work off the engine's thread
    (a bank sync, an upload): a pooled thread would keep the team it starts beside the engine's. The
    thread runs at a lower CPU priority, so that requests come first (switchbank/priority.py)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="switchbank-apart", initializer=lower_this_thread)
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=False)
