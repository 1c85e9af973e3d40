"""Crash consistency, overload, soak and limits against the real server on loopback (bounded in time).

    python -m bench.reliability crash --rounds 30
    python -m bench.reliability overload
    python -m bench.reliability soak --seconds 180
    python -m bench.reliability limits       # peak memory of the worst images; slow and idle clients
    python -m bench.reliability all          # all four

Each writes its part of bench/results/reliability.{json,md}, keeping the others' latest results.

Runs on a copy of the demo bank. Every load loop is bounded in requests and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from bench.common import ROOT, demo_traffic, free_port, start_server, wait_ready

RESULTS = ROOT / "bench" / "results"
TOKEN = "reliability-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def start(bank: Path, port: int, **env):
    return start_server(bank, port, admin_token=TOKEN, device="cpu", **env)


def copy_demo_bank() -> Path:
    d = Path(tempfile.mkdtemp(prefix="switchbank-rel-")) / "bank"
    shutil.copytree(ROOT / "demo" / "bank", d)
    return d


def churn_versions(bank: Path, n: int = 3) -> dict[str, list[bytes]]:
    """Valid switch files to upload: copies of a demo switch under new names, each in n versions
    (different head biases), without query examples so that they never change Auto-Switch routes."""
    from switchbank.bank import Bank
    from switchbank.format import to_bytes
    base = Bank(bank).load("faces")
    out = {}
    for name in ("churn-a", "churn-b"):
        out[name] = []
        for v in range(n):
            base.name, base.queries, base.router_fingerprint = name, None, None
            base.head.bias = base.head.bias + 0.01 * (v + 1)
            out[name].append(to_bytes(base))
    return out


# --- crash consistency ---------------------------------------------------------------------------
def crash(rounds: int = 30, seed: int = 0) -> dict:
    """SIGKILL the server at random moments during uploads, replacements and deletes; after each
    kill the bank must load, and every switch must be exactly one version that was uploaded."""
    from switchbank.bank import Bank
    from switchbank.format import from_bytes
    rng = random.Random(seed)
    bank = copy_demo_bank()
    versions = churn_versions(bank)
    known = {name: {from_bytes(v).content_hash for v in vs} for name, vs in versions.items()}
    ops_total, kills, gen_before = 0, 0, Bank(bank).generation
    for r in range(rounds):
        port = free_port()
        proc = start(bank, port)
        wait_ready(port, proc)
        stop = threading.Event()
        ops = [0]

        def admin():
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10) as c:
                while not stop.is_set():
                    name = rng.choice(list(versions))
                    try:
                        if rng.random() < 0.3:
                            c.delete(f"/v1/admin/switches/{name}")
                        else:
                            c.post("/v1/admin/switches", params={"replace": "true"},
                                   files={"file": ("s", rng.choice(versions[name]))})
                        ops[0] += 1
                    except httpx.TransportError:
                        return  # the server was killed mid-request

        t = threading.Thread(target=admin)
        t.start()
        time.sleep(rng.uniform(0.05, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        t.join()
        kills += 1
        ops_total += ops[0]
        gen, switches = Bank(bank).load_all()  # verifies every file's content hash
        assert gen >= gen_before, "generation went backwards"
        gen_before = gen
        for name, sw in switches.items():
            if name in known:
                assert sw.content_hash in known[name], f"round {r}: {name} is not a version that was uploaded"
        assert {"mnist", "faces"} <= set(switches), "an untouched switch was lost"
    # a final clean start must serve exactly the bank's switches
    port = free_port()
    proc = start(bank, port)
    wait_ready(port, proc)
    served = {s["name"] for s in httpx.get(f"http://127.0.0.1:{port}/v1/switches").json()["switches"]}
    proc.terminate()
    proc.wait(30)
    assert served == set(Bank(bank).names())
    shutil.rmtree(bank.parent)
    return {"rounds": rounds, "kills": kills, "admin_ops": ops_total, "final_generation": gen_before, "ok": True}


# --- overload ------------------------------------------------------------------------------------
async def _flood(url: str, reqs, concurrency: int, seconds: float) -> dict:
    statuses, retry_after = {}, set()
    deadline = time.perf_counter() + seconds
    it = iter(reqs * 1000)

    async def worker(c):
        while time.perf_counter() < deadline:
            png, fields = next(it)
            r = await c.post("/v1/predict", files={"image": ("i.png", png)}, data=fields)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 503:
                retry_after.add(r.headers.get("retry-after"))

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=concurrency)) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return {"statuses": statuses, "retry_after": sorted(x for x in retry_after if x)}


def overload(seconds: float = 10, concurrency: int = 64) -> dict:
    bank = copy_demo_bank()
    port = free_port()
    proc = start(bank, port, queue_limit=8, batch_size=4)
    wait_ready(port, proc)
    url = f"http://127.0.0.1:{port}"
    reqs = demo_traffic(30, per_task=10)
    rss = psutil.Process(proc.pid)
    rss_before = rss.memory_info().rss
    flood = asyncio.run(_flood(url, reqs, concurrency, seconds))
    rss_peak = rss.memory_info().rss
    calm = asyncio.run(_flood(url, reqs, 2, 3))  # load drops: every request answered again
    proc.terminate()
    proc.wait(30)
    shutil.rmtree(bank.parent)
    assert flood["statuses"].get(503, 0) > 0 and flood["retry_after"], "a full queue must answer 503 + Retry-After"
    assert set(flood["statuses"]) <= {200, 503}, f"unexpected statuses {flood['statuses']}"
    assert set(calm["statuses"]) == {200}, "the server must recover when load drops"
    return {"flood": flood, "after": calm, "rss_before_mb": rss_before / 1e6, "rss_peak_mb": rss_peak / 1e6}


# --- soak ----------------------------------------------------------------------------------------
def soak(seconds: float = 180, concurrency: int = 8) -> dict:
    """Shuffled held-out images of all six demo tasks (half named, half Auto-Switch) plus periodic
    uploads and deletes of switches that do not take part in routing; every answer must equal the
    same request served alone before the soak."""
    bank = copy_demo_bank()
    versions = churn_versions(bank, n=2)
    port = free_port()
    proc = start(bank, port)
    wait_ready(port, proc)
    url = f"http://127.0.0.1:{port}"
    reqs = demo_traffic(240)  # shuffled held-out images of all six tasks
    with httpx.Client(base_url=url, timeout=30) as c:
        expected = [c.post("/v1/predict", files={"image": ("i.png", p)}, data=f).json() for p, f in reqs]
    key = lambda r: (r["head"], r["weights"], [x["label"] for x in r["predictions"]])  # noqa: E731
    p = psutil.Process(proc.pid)
    rss = [p.memory_info().rss]

    def cache_bytes() -> int:
        return httpx.get(f"{url}/v1/admin/cache", headers=AUTH).json()["bytes"]

    cached = [cache_bytes()]  # beside each memory sample: how much of the drift is the cache filling
    counts = {"requests": 0, "mismatches": 0, "errors": 0, "uploads": 0, "deletes": 0}
    stop = time.time() + seconds

    def admin():
        rng = random.Random(1)
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            while time.time() < stop:
                name = rng.choice(list(versions))
                if rng.random() < 0.4:
                    if c.delete(f"/v1/admin/switches/{name}").status_code == 200:
                        counts["deletes"] += 1
                else:
                    c.post("/v1/admin/switches", params={"replace": "true"}, files={"file": ("s", rng.choice(versions[name]))})
                    for _ in range(2):  # used in two batches: its merged weights are cached (SWITCHBANK_HOT_AFTER)
                        c.post("/v1/predict", files={"image": ("i.png", reqs[0][0])}, data={"task": name})
                    counts["uploads"] += 1
                time.sleep(0.5)

    async def traffic():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def worker(i):
                j = i
                while time.time() < stop:
                    png, fields = reqs[j % len(reqs)]
                    r = await c.post("/v1/predict", files={"image": ("i.png", png)}, data=fields)
                    counts["requests"] += 1
                    if r.status_code != 200:
                        counts["errors"] += 1
                    elif key(r.json()) != key(expected[j % len(reqs)]):
                        counts["mismatches"] += 1
                    j += concurrency
            await asyncio.gather(*(worker(i) for i in range(concurrency)))

    t = threading.Thread(target=admin)
    t.start()
    sampler_stop = threading.Event()

    def sample():
        while not sampler_stop.wait(5):
            rss.append(p.memory_info().rss)
            cached.append(cache_bytes())

    s = threading.Thread(target=sample)
    s.start()
    asyncio.run(traffic())
    t.join()
    sampler_stop.set()
    s.join()

    def of_uploaded(stats) -> int:
        return sum(stats["switches"].get(n, {}).get("cached_combinations", 0) for n in versions)

    cache = httpx.get(f"{url}/v1/admin/cache", headers=AUTH).json()
    for name in versions:  # delete everything uploaded: its cached merges must go
        httpx.delete(f"{url}/v1/admin/switches/{name}", headers=AUTH)
    cache_after = httpx.get(f"{url}/v1/admin/cache", headers=AUTH).json()
    rss.append(p.memory_info().rss)
    proc.terminate()
    proc.wait(30)
    shutil.rmtree(bank.parent)
    assert of_uploaded(cache_after) == 0, "merges of deleted switches must leave the cache"

    def drift(samples) -> float:
        third = max(1, len(samples) // 3)
        return (sum(samples[-third:]) - sum(samples[:third])) / third / 1e6

    return {**counts, "seconds": seconds, "rss_start_mb": rss[0] / 1e6, "rss_end_mb": rss[-1] / 1e6,
            "rss_drift_mb": drift(rss), "cache_drift_mb": drift(cached), "cache_bytes_during": cache["bytes"],
            "cached_of_uploaded": of_uploaded(cache),
            "cache_bytes_after_deletes": cache_after["bytes"], "cache_entries_after_deletes": cache_after["entries"]}


# --- limits ---------------------------------------------------------------------------------------
def worst_images() -> dict[str, bytes]:
    """The most expensive images a client can send within the default limits (40 MP, 32 MiB body)."""
    import io

    import numpy as np
    from PIL import Image

    def save(im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    side = 6324  # 39.99 MP
    rng = np.random.default_rng(0)
    rgba = np.zeros((side, side, 4), np.uint8)
    rgba[:64, :64] = rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)
    grey16 = np.zeros((side, side), np.uint16)
    grey16[:64, :64] = rng.integers(0, 65535, (64, 64), dtype=np.uint16)
    floats = np.zeros((side, side), np.float32)
    floats[:64, :64] = rng.random((64, 64), dtype=np.float32)
    strip = rng.integers(0, 255, (1, 100_000, 3), dtype=np.uint8)
    return {
        "40 MP RGBA PNG (transparency laid on white)": save(Image.fromarray(rgba, "RGBA"), "PNG"),
        "40 MP 16-bit greyscale PNG": save(Image.fromarray(grey16), "PNG"),
        "40 MP float32 TIFF, deflate": save(Image.fromarray(floats, "F"), "TIFF", compression="tiff_adobe_deflate"),
        "40 MP JPEG with EXIF rotation": save(Image.fromarray(rgba[..., :3]), "JPEG",
                                             exif=_rotated_exif()),
        "100000 x 1 PNG strip": save(Image.fromarray(strip), "PNG"),
        "400 x 100000 PNG strip": save(Image.fromarray(np.zeros((100_000, 400, 3), np.uint8)), "PNG"),
    }


def _rotated_exif():
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


def _hwm(pid: int) -> int:
    """Peak resident memory of a process so far (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def image_memory() -> list[dict]:
    """Per image, a fresh server: peak resident memory after a warm-up request, then after the image."""
    out = []
    for what, data in worst_images().items():
        port = free_port()
        proc = start(ROOT / "demo" / "bank", port)
        wait_ready(port, proc)
        url = f"http://127.0.0.1:{port}"
        try:
            small = demo_traffic(1)[0][0]
            httpx.post(f"{url}/v1/predict", files={"image": ("i.png", small)}, data={"task": "mnist"}, timeout=60)
            before = _hwm(proc.pid)
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/predict", files={"image": ("i", data)}, data={"task": "mnist"}, timeout=120)
            seconds = time.perf_counter() - t0
            out.append({"image": what, "bytes": len(data), "status": r.status_code, "seconds": seconds,
                        "peak_rss_mb": _hwm(proc.pid) / 2**20, "peak_before_mb": before / 2**20})
            print(out[-1], flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    return out


def _cut_after(port: int, send: bytes, every: float, limit: float, first: bytes = b"") -> float | None:
    """Seconds until the server closes a connection that sends ``first`` at once, then ``send`` a
    byte every ``every`` s."""
    import socket
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(first)
        s.settimeout(0.1)
        t0, i, nxt = time.monotonic(), 0, 0.0
        while time.monotonic() - t0 < limit:
            now = time.monotonic() - t0
            if i < len(send) and now >= nxt:
                try:
                    s.sendall(send[i:i + 1])
                except OSError:
                    return now
                i, nxt = i + 1, now + every
            try:
                data = s.recv(65536)
                if not data or b" 408 " in data:
                    return time.monotonic() - t0
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - t0
    return None


def slow_clients() -> dict:
    """Time until the server cuts off an idle connection, headers sent at 1 byte/s and a body sent at
    1 byte/s, with the default deadlines; and whether a real client is served meanwhile."""
    import socket
    port = free_port()
    proc = start(ROOT / "demo" / "bank", port)
    wait_ready(port, proc)
    url = f"http://127.0.0.1:{port}"
    try:
        body = b"x" * 1000
        post = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/predict", files={"image": ("i.png", demo_traffic(1)[0][0])}, timeout=60)
        served = {"status": r.status_code, "seconds": time.perf_counter() - t0}
        out = {
            "idle_connection_cut_s": _cut_after(port, b"", 1.0, 60),
            "headers_at_1_byte_per_s_cut_s": _cut_after(port, b"GET /livez HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 100,
                                                        1.0, 60),
            "request_with_200_idle_connections_open": served,
        }
        out["body_at_1_byte_per_s_answered_408_s"] = _cut_after(port, body, 1.0, 90, first=post)
        for s in idle:
            s.close()
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def limits() -> dict:
    return {"images": image_memory(), "slow_clients": slow_clients()}


def report(results: dict) -> None:
    lines = ["# Reliability", ""]
    if "crash" in results:
        c = results["crash"]
        lines += ["## Crash consistency", "",
                  f"{c['rounds']} rounds: the server was SIGKILLed at a random moment while {c['admin_ops']} uploads, "
                  f"replacements and deletes ran; after every kill the bank loaded with every file verified, and every "
                  f"switch was exactly one uploaded version. Final generation {c['final_generation']}.", "",
                  f"Reproduce: `python -m bench.reliability crash --rounds {c['rounds']}`", ""]
    if "overload" in results:
        o = results["overload"]
        lines += ["## Overload", "",
                  f"64 concurrent clients against a queue of 8 for 10 s: statuses {o['flood']['statuses']}, Retry-After "
                  f"{o['flood']['retry_after']}; resident memory {o['rss_before_mb']:.0f} MB before, {o['rss_peak_mb']:.0f} MB "
                  f"at the end of the flood; afterwards, 2 clients got {o['after']['statuses']}.", "",
                  "Reproduce: `python -m bench.reliability overload`", ""]
    if "soak" in results:
        s = results["soak"]
        lines += ["## Soak", "",
                  f"{s['seconds']:.0f} s of traffic from 8 clients (the held-out test images of all six demo tasks, shuffled, "
                  f"half naming their task and half left to Auto-Switch) with {s['uploads']} uploads and {s['deletes']} "
                  f"deletes: {s['requests']} requests, {s['errors']} errors (5xx or otherwise), {s['mismatches']} answers "
                  f"that differed from the same request served alone. Resident memory {s['rss_start_mb']:.0f} MB at start, "
                  f"{s['rss_end_mb']:.0f} MB at the end, drift {s['rss_drift_mb']:+.1f} MB (mean of the last third of "
                  f"samples minus the first third), of which the cache of merged weights, filling as combinations "
                  f"turn hot, {s['cache_drift_mb']:+.1f} MB. Cache bytes {s['cache_bytes_during']:,} at the end of the soak, "
                  f"{s['cached_of_uploaded']} cached combinations using the uploaded switches; "
                  f"{s['cache_bytes_after_deletes']:,} ({s['cache_entries_after_deletes']} combinations) after deleting "
                  "them, none of which uses them: what remains are merges of the six demo switches that the traffic used.", "",
                  f"Reproduce: `python -m bench.reliability soak --seconds {s['seconds']:.0f}`", ""]
    if "limits" in results:
        li = results["limits"]
        rows = "\n".join(f"| {i['image']} | {i['bytes'] / 2**20:.2f} MiB | {i['status']} | {i['seconds']:.2f} s | "
                         f"{i['peak_before_mb']:.0f} MB | {i['peak_rss_mb']:.0f} MB |" for i in li["images"])
        sc = li["slow_clients"]
        lines += ["## Limits", "",
                  "The most expensive images within the default limits (40 MP decoded, 32 MiB body), each sent to a "
                  "fresh server after one small warm-up request; peak resident memory of the server process (VmHWM):", "",
                  "| image | file | status | time | peak before | peak after |", "|---|---|---|---|---|---|", rows, "",
                  "Slow and idle clients, default deadlines (headers 10 s, whole body 30 s): an idle connection was "
                  f"closed after {sc['idle_connection_cut_s']:.1f} s, headers sent at 1 byte/s after "
                  f"{sc['headers_at_1_byte_per_s_cut_s']:.1f} s, and a body sent at 1 byte/s was answered 408 after "
                  f"{sc['body_at_1_byte_per_s_answered_408_s']:.1f} s. With 200 idle connections open, a real request "
                  f"was answered {sc['request_with_200_idle_connections_open']['status']} in "
                  f"{sc['request_with_200_idle_connections_open']['seconds']:.2f} s.", "",
                  "Reproduce: `python -m bench.reliability limits`", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability.md").write_text("\n".join(lines))
    (RESULTS / "reliability.json").write_text(json.dumps(results, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["crash", "overload", "soak", "limits", "all"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=180)
    args = ap.parse_args(argv)
    results = {}
    if args.what in ("crash", "all"):
        results["crash"] = crash(args.rounds)
        print("crash:", results["crash"], flush=True)
    if args.what in ("overload", "all"):
        results["overload"] = overload()
        print("overload:", results["overload"], flush=True)
    if args.what in ("soak", "all"):
        results["soak"] = soak(args.seconds)
        print("soak:", results["soak"], flush=True)
    if args.what in ("limits", "all"):
        results["limits"] = limits()
        print("limits:", results["limits"], flush=True)
    if args.what != "all":  # one part: the others' latest results stay in the report
        path = RESULTS / "reliability.json"
        results = {**(json.loads(path.read_text()) if path.is_file() else {}), **results}
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
