"""End to end over HTTP on loopback: a bounded load generator with mixed-task traffic.

    python -m bench.http [--clients 1,8,32] [--requests 400] [--seconds 60]

Starts the real server on the demo bank (workload B) in a subprocess, then for each concurrency
sends a bounded number of requests (bounded in time too): a mix of named-task and Auto-Switch
requests over every task's test images. Reports requests/s, p50/p95/p99 latency and the cache hit
rate, against the in-process engine on the same traffic (decode + preprocess + engine.run in
batches of the server's batch size, no HTTP).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import httpx

from bench.common import ROOT, demo_traffic, free_port, md_table, start_server, wait_ready, write

TOKEN = "bench-token"


def start(port: int):
    proc = start_server(ROOT / "demo" / "bank", port, admin_token=TOKEN)
    wait_ready(port, proc)
    return proc


async def load_test(url: str, reqs, clients: int, seconds: float) -> dict:
    latencies, errors, statuses = [], 0, {}
    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    deadline = time.perf_counter() + seconds

    async def worker(client):
        nonlocal errors
        while time.perf_counter() < deadline:
            try:
                png, fields = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            r = await client.post("/v1/predict", files={"image": ("i.png", png, "image/png")}, data=fields)
            latencies.append(time.perf_counter() - t0)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "seconds": wall, "rps": len(latencies) / wall, "errors": errors,
            "statuses": statuses, "p50_ms": q[49] * 1000, "p95_ms": q[94] * 1000, "p99_ms": q[98] * 1000}


def cache_stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/admin/cache", headers={"Authorization": f"Bearer {TOKEN}"}).json()


def in_process(reqs, batch: int) -> float:
    """Requests/s of decode + preprocess + engine.run on the same traffic, no HTTP."""
    from app.imaging import decode
    from switchbank.backbone import DEMO_ARCH, load_backbone
    from switchbank.bank import Bank
    from switchbank.engine import Engine, Route
    import torch
    backbone = load_backbone(DEMO_ARCH)
    eng = Engine(backbone)
    eng.sync(Bank(ROOT / "demo" / "bank"))

    def run(chunk):
        x = torch.stack([backbone.preprocess(decode(png, 40_000_000)) for png, _ in chunk])
        eng.run(x, [Route(task=f.get("task")) for _, f in chunk])

    run(reqs[:batch])  # warm the cache like the server's first requests do
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        run(reqs[i:i + batch])
    return len(reqs) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args(argv)
    reqs = demo_traffic(args.requests, per_task=40)
    engine_rps = in_process(reqs, batch=16)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(port)
    rows, results = [], []
    try:
        asyncio.run(load_test(url, reqs[:32], 4, 30))  # warm-up
        for c in (int(x) for x in args.clients.split(",")):
            before = cache_stats(url)
            r = asyncio.run(load_test(url, reqs, c, args.seconds))
            after = cache_stats(url)
            lookups = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
            r["cache_hit_rate"] = (after["hits"] - before["hits"]) / lookups if lookups else None
            r["clients"] = c
            r["vs_in_process"] = r["rps"] / engine_rps
            results.append(r)
            rows.append([c, r["requests"], r["rps"], r["p50_ms"], r["p95_ms"], r["p99_ms"], r["errors"],
                         r["cache_hit_rate"], r["vs_in_process"]])
            print(rows[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    table = md_table(["clients", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "cache hit rate",
                      "x in-process"], rows)
    print(table)
    print(f"in-process engine: {engine_rps:.1f} req/s")
    write("perf-http", {"in_process_rps": engine_rps, "results": results},
          f"# HTTP end to end (demo bank, mixed-task traffic, loopback)\n\n{table}\n\n"
          f"In-process engine on the same traffic: {engine_rps:.1f} req/s. Target at saturation: at least 0.85x.\n"
          "Rerun: `python -m bench.http`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
