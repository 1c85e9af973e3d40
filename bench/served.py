"""``switchbank serve`` plus one route for the HTTP benchmark: POST /bench/in-process runs the
in-process reference (decode, preprocess and engine.run in batches of the server's size, no HTTP)
inside the server's own process, on its engine, on the thread that runs its batches.

    python -m bench.served --port PORT [--bank DIR]     (other settings from SWITCHBANK_* as usual)

Why inside the server: two processes running the same forward on the same machine differ by up
to about 10% in speed, from one start to the next, which would swamp what HTTP costs. Measured in one process, on one engine, the ratio shows what serving adds and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from fastapi import Request  # at module level: FastAPI resolves the route's annotations there

from app.threads import engine_thread as new_engine_thread


def in_process_rate(engine, reqs: list[tuple[bytes, dict]], batch: int, max_pixels: int) -> float:
    """Requests/s of decode + preprocess + engine.run over ``reqs`` in batches of ``batch``."""
    import torch

    from app.imaging import decode
    from switchbank.engine import Route

    def run(chunk):
        x = torch.stack([engine.backbone.preprocess(decode(png, max_pixels)) for png, _ in chunk])
        engine.run(x, [Route(task=f.get("task")) for _, f in chunk])

    run(reqs[:batch])  # as warm as the server after its warm-up
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        run(reqs[i:i + batch])
    return len(reqs) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--bank")
    args = ap.parse_args(argv)
    # as `switchbank serve` does: torch and the server's modules imported on the engine's thread
    engine_thread = new_engine_thread("app.main", "bench.common")
    from app.main import create_app
    from app.serve import server
    from app.settings import Settings
    from bench.common import demo_traffic

    settings = Settings(**({"bank": args.bank} if args.bank else {}))
    app = create_app(settings, engine_thread=engine_thread)
    traffic: dict[tuple, list] = {}

    @app.post("/bench/in-process")
    async def in_process(request: Request) -> dict:
        """Body {"requests": n, "per_task": k, "seed": s}: the same traffic the benchmark sends."""
        spec = await request.json()
        per_task = spec.get("per_task")
        key = (int(spec["requests"]), None if per_task is None else int(per_task), int(spec.get("seed", 0)))
        state = request.app.state
        loop = asyncio.get_running_loop()
        if key not in traffic:  # on the engine's thread too, since it makes tensors
            traffic[key] = await loop.run_in_executor(state.batcher.executor, demo_traffic, *key)
        rate = await loop.run_in_executor(state.batcher.executor, in_process_rate, state.engine, traffic[key],
                                          settings.batch_size, settings.max_image_pixels)
        return {"rps": rate}

    server(app, settings, "127.0.0.1", args.port).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
