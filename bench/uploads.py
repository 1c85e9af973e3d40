"""A bank grown over HTTP: uploads into a running server, one at a time, up to thousands of switches.

    python -m bench.uploads [--switches 1000,3000]

For each size, starts the real server (`switchbank serve`, cosine routing as the demo serves) on a
copy of the demo bank, then uploads that many distinct switches (made as bench.scale makes them: demo
switches under new names, each with its own query embeddings) through `POST /v1/admin/switches`,
in file-name order, which is one demo task's copies after another's (a bank that grows one domain
at a time), timing each upload. 1,000 switches keep the exact index; 3,000 take the router past
its exact limit (200,000 vectors on CPUs with fast bfloat16 products) to an IVF index. Before and after, it sends the same held-out demo images (Auto-Switch) and records their
latency, the answers and the server's resident memory. Then it starts a second server on the bank
the uploads left and does the same, so that the router the uploads grew one switch at a time can be
compared with one built at start-up: the answers must be equal (same routing weights, same top
class), and memory and latency show what growing the router in place costs.

While the uploads run, a second client sends Auto-Switch requests (held-out images of all six demo
tasks, shuffled) at ``--rate`` a second, one at a time, and a third notes every quarter second whether
the router is rebuilding: the latency users see while the bank grows, split by whether a rebuild
was running. ``--rate 0`` times the uploads alone.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.common import ROOT, free_port, md_table, start_server, wait_ready, write
from bench.scale import synth_bank
from bench.traffic import demo_pngs

TOKEN = "bench-uploads"


@contextmanager
def serving(bank: Path):
    """The server on ``bank`` (cosine routing, admin token set), once ready: (an admin client, its
    process, seconds from start to ready)."""
    port = free_port()
    t0 = time.perf_counter()
    proc = start_server(bank, port, router_metric="cosine", admin_token=TOKEN)
    try:
        wait_ready(port, proc, timeout=300)
        ready_s = time.perf_counter() - t0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            yield c, proc, ready_s
    finally:
        proc.terminate()
        proc.wait(30)


def router(c: httpx.Client) -> dict:
    return c.get("/v1/admin/cache").json()["router"]


def settle(c: httpx.Client, limit: float = 600) -> float:
    """Seconds until the server's router is not rebuilding (at most ``limit``)."""
    t = time.perf_counter()
    while router(c)["rebuilding"] and time.perf_counter() - t < limit:
        time.sleep(0.5)
    return time.perf_counter() - t


def ask(c: httpx.Client, pngs: list[bytes]) -> tuple[list[float], list[tuple]]:
    """Auto-Switch answers for ``pngs``, one request at a time: latencies and (weights, top class)."""
    lat, answers = [], []
    for png in pngs:
        t = time.perf_counter()
        r = c.post("/v1/predict", files={"image": ("i.png", png)})
        lat.append(time.perf_counter() - t)
        r.raise_for_status()
        body = r.json()
        answers.append((sorted(body["weights"].items()), body["predictions"][0]["label"]))
    return lat, answers


def figures(c: httpx.Client, lat: list[float], proc) -> dict:
    """Latency of ``lat``, and the server's resident memory with what its caches hold of it."""
    stats = c.get("/v1/admin/cache").json()
    return {"first_ms": 1000 * lat[0], "p50_ms": 1000 * statistics.median(lat[1:]),
            "rss_mb": psutil.Process(proc.pid).memory_info().rss / 2**20,
            "cache_mb": stats["bytes"] / 2**20, "resident_switches_mb": stats["resident"]["resident_bytes"] / 2**20}


class Traffic:
    """Auto-Switch requests at ``rate`` a second on one connection, and the router's rebuilding flag
    every quarter second on another, in threads, until stopped."""

    def __init__(self, base_url: str, pngs: list[bytes], rate: float):
        self.base_url, self.pngs, self.rate = base_url, pngs, rate
        self.done = threading.Event()
        self.requests: list[tuple[float, float, int]] = []  # (start, end, status)
        self.polls: list[tuple[float, bool]] = []  # (time, rebuilding)
        self.threads = [threading.Thread(target=self._ask, daemon=True), threading.Thread(target=self._poll, daemon=True)]

    def __enter__(self):
        if self.rate > 0:
            for t in self.threads:
                t.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        for t in self.threads:
            if t.is_alive():
                t.join()

    def _ask(self) -> None:
        rng = random.Random(0)
        with httpx.Client(base_url=self.base_url, timeout=120) as c:
            next_at = time.perf_counter()
            while not self.done.is_set():
                png = rng.choice(self.pngs)
                t = time.perf_counter()
                try:
                    status = c.post("/v1/predict", files={"image": ("i.png", png)}).status_code
                except httpx.HTTPError:
                    status = -1  # counted as an error
                self.requests.append((t, time.perf_counter(), status))
                next_at = max(next_at + 1 / self.rate, time.perf_counter())
                self.done.wait(next_at - time.perf_counter())

    def _poll(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            while not self.done.is_set():
                self.polls.append((time.perf_counter(), bool(router(c)["rebuilding"])))
                self.done.wait(0.25)

    def figures(self) -> dict:
        """Latency of the requests sent during the uploads, all of them and split by whether a poll
        within a quarter second before or during a request saw the router rebuilding."""
        def stats(lat):
            if not lat:
                return {"count": 0}
            return {"count": len(lat), "p50_ms": 1000 * statistics.median(lat),
                    "p99_ms": 1000 * float(np.quantile(lat, 0.99)), "max_ms": 1000 * max(lat)}
        during, outside = [], []
        for t0, t1, _ in self.requests:
            rebuilding = any(r for t, r in self.polls if t0 - 0.25 <= t <= t1)
            (during if rebuilding else outside).append(t1 - t0)
        return {"rate": self.rate, "errors": sum(s != 200 for *_, s in self.requests),
                "all": stats(during + outside), "rebuilding": stats(during), "not_rebuilding": stats(outside)}


def run(n: int, work: Path, requests: int = 40, rate: float = 5.0) -> dict:
    src = synth_bank(n + 6, work / "made", distinct=True)
    demo_files = {p.name for p in (ROOT / "demo" / "bank" / "switches").iterdir()}
    files = [p for p in sorted((src / "switches").iterdir()) if p.name not in demo_files][:n]
    bank = work / "bank"
    shutil.copytree(ROOT / "demo" / "bank", bank)
    held_out = demo_pngs()
    pngs = [png for _, png in held_out[::24][:requests]]  # spread over the six tasks

    with serving(bank) as (c, proc, _):
        lat, _ = ask(c, pngs)
        before = figures(c, lat, proc)
        ups = []
        with Traffic(str(c.base_url), [png for _, png in held_out], rate) as traffic:
            for i, f in enumerate(files):
                t = time.perf_counter()
                r = c.post("/v1/admin/switches", files={"file": (f.name, f.read_bytes())})
                ups.append(time.perf_counter() - t)
                if r.status_code not in (200, 201):
                    raise RuntimeError(f"upload {i} answered {r.status_code}: {r.text[:200]}")
                if (i + 1) % max(1, n // 10) == 0:
                    print(f"{i + 1} uploads, median {1000 * statistics.median(ups[-100:]):.1f} ms over the last 100",
                          file=sys.stderr, flush=True)
        settle_s = settle(c)  # a rebuild the last uploads started finishes first
        lat, grown_answers = ask(c, pngs)
        grown = {**figures(c, lat, proc), "settle_s": settle_s, "router": router(c)}

    with serving(bank) as (c, proc, ready_s):
        settle_s = settle(c)  # a bank past the exact limit is served exactly while its IVF index builds
        lat, fresh_answers = ask(c, pngs)
        fresh = {**figures(c, lat, proc), "ready_s": ready_s, "settle_s": settle_s, "router": router(c)}

    tenth = max(1, n // 10)
    return {"switches": n, "requests": requests, "before": before, "grown": grown, "restarted": fresh,
            "during_uploads": traffic.figures() if rate > 0 else None,
            "upload_ms": {"median": 1000 * statistics.median(ups), "p99": 1000 * float(np.quantile(ups, 0.99)),
                          "max": 1000 * max(ups),
                          "median_first_tenth": 1000 * statistics.median(ups[:tenth]),
                          "median_last_tenth": 1000 * statistics.median(ups[-tenth:])},
            "answers_equal": sum(a == b for a, b in zip(grown_answers, fresh_answers))}


def report(r: dict) -> str:
    n, u = r["switches"], r["upload_ms"]
    rows = []
    for label, key in (("demo bank (6 switches), before the uploads", "before"),
                       (f"after {n:,} uploads, same process", "grown"),
                       (f"restarted on the grown bank ({n + 6:,} switches)", "restarted")):
        f = r[key]
        router = f.get("router", {})
        rows.append([label, f"{f['rss_mb']:.0f} MB", f"{f['cache_mb']:.0f} / {f['resident_switches_mb']:.0f} MB",
                     f"{f['first_ms']:.0f} ms", f"{f['p50_ms']:.1f} ms",
                     f"{router.get('kind', '')} {router.get('scan', '')}".strip() or "-",
                     f"{router['bytes'] / 2**20:.0f} MiB" if router else "-"])
    table = md_table(["server", "resident memory", "of which merged-weight cache / resident switch bits",
                      "first Auto-Switch request", "Auto-Switch p50",
                      "router", "router index"], rows)
    return (f"## A bank grown over HTTP: {n:,} uploads\n\n"
            f"Upload latency: median {u['median']:.1f} ms (first tenth {u['median_first_tenth']:.1f} ms, last tenth "
            f"{u['median_last_tenth']:.1f} ms), p99 {u['p99']:.1f} ms, max {u['max']:.0f} ms. A router rebuild still "
            f"running after the last upload took {r['grown']['settle_s']:.1f} s more. Start-up on the grown bank: "
            f"{r['restarted']['ready_s']:.1f} s to ready, and its router's final index "
            f"{r['restarted'].get('settle_s', 0):.1f} s later.\n\n"
            f"{table}\n\n"
            f"The same {r['requests']} held-out demo images (Auto-Switch) gave equal routing weights and top class on the "
            f"grown and the restarted server for {r['answers_equal']} of {r['requests']}; the grown server's router "
            f"was rebuilt {r['grown']['router']['rebuilds']} times on the way." + during(r.get("during_uploads")))


def during(d: dict | None) -> str:
    if not d:
        return "\n\nThe uploads ran alone (no requests meanwhile)."
    rows = [[label, str(d[key]["count"])] + ([f"{d[key][k]:.1f} ms" for k in ("p50_ms", "p99_ms", "max_ms")]
                                              if d[key]["count"] else ["-", "-", "-"])
            for label, key in (("all", "all"), ("while the router was rebuilding", "rebuilding"),
                               ("otherwise", "not_rebuilding"))]
    return (f"\n\nAuto-Switch requests sent during the uploads, {d['rate']:g} a second, one at a time, held-out "
            f"images of the six demo tasks shuffled ({d['errors']} answered with an error):\n\n"
            + md_table(["requests", "count", "p50", "p99", "max"], rows))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switches", default="1000,3000", help="bank sizes, comma-separated")
    ap.add_argument("--rate", type=float, default=5.0,
                    help="Auto-Switch requests a second sent during the uploads (0: none)")
    args = ap.parse_args(argv)
    runs = []
    for n in (int(v) for v in args.switches.split(",")):
        with tempfile.TemporaryDirectory(prefix="sb-uploads-") as tmp:
            runs.append(run(n, Path(tmp), rate=args.rate))
    md = "\n\n".join(report(r) for r in runs) + "\n\nRerun: `python -m bench.uploads`."
    print(md)
    print(write("uploads", {"runs": runs}, md))


if __name__ == "__main__":
    main()
