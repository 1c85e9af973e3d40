"""A bank of thousands of switches: start-up, memory, routing cost and agreement, cold switches.

    python -m bench.scale [--sizes 100,1000,10000] [--nprobe 8,16,32,64,128]

Banks are synthesised from the six demo switches: switch i is demo switch i mod 6 under a new name
(the first six are the demo files themselves, format version 1), written in format version 2 with
its query embeddings moved by a random offset per switch (half the typical query norm), so every
switch owns a distinct region of the router's space. For each size it measures:
- the real server (`switchbank serve`, cosine routing as the demo serves), started three times
  (medians): seconds from process start to ready, to the first Auto-Switch answer (sent at once;
  it also loads its switches' bits) and to the router's final index (a bank past the exact scan's
  limit is routed exactly from ready while its IVF index builds), resident memory once ready and
  after 40 Auto-Switch requests, and those requests' median latency, next to the same figures for
  the six-switch demo bank;
- in process: the router's final index, its k-NN time for a batch of 16 against the forward of that batch,
  and its routing against exact search over the same bank (weights equal) on the 977 held-out demo
  images and on 2,000 inputs drawn near synthetic switches' queries, with the demo routing accuracy
  (the top switch is a copy of the image's own task) for both; at the largest size, a sweep of nprobe;
- a cold switch: reading and decoding its bits plus merging it, against merging it with its bits
  already resident.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from bench.common import ROOT, free_port, md_table, start_server, wait_ready, write
from switchbank.bank import file_name
from switchbank.format import META_KEY, content_hash

DEMO = ROOT / "demo" / "bank"


def query_offset(rng: np.random.Generator, dim: int, norm: float) -> np.ndarray:
    """The random move of one distinct switch's query embeddings: half the typical query ``norm``."""
    offset = rng.normal(size=dim).astype(np.float32)
    offset *= 0.5 * norm / np.linalg.norm(offset)
    return offset


def count_owners(rows, owner) -> list[dict[str, int]]:
    """Per row of example positions, how many of them each task owns (``owner[position]``)."""
    out = []
    for row in rows:
        c: dict[str, int] = {}
        for i in row:
            if i >= 0:
                c[owner[i]] = c.get(owner[i], 0) + 1
        out.append(c)
    return out


def synth_bank(n: int, dest: Path, seed: int = 0, distinct: bool = True) -> Path:
    """A bank of ``n`` switches made from the demo ones (see the module docstring); with
    ``distinct=False``, plain renamed copies that keep their query embeddings."""
    manifest = json.loads((DEMO / "manifest.json").read_text())
    demo = {name: (DEMO / "switches" / info["file"]).read_bytes() for name, info in sorted(manifest["switches"].items())}
    names = list(demo)
    files = dest / "switches"
    files.mkdir(parents=True)
    norms = np.median([np.linalg.norm(st_load(d)["queries"].numpy(), axis=1).mean() for d in demo.values()])
    rng = np.random.default_rng(seed)
    entries = {}
    for i in range(n):
        task = names[i % len(names)]
        data = demo[task]
        if i >= len(names):
            task = f"{task}-{i:05d}"
            tensors = dict(st_load(data))
            n_head = len(data[8:8 + int.from_bytes(data[:8], "little")])
            meta = json.loads(json.loads(data[8:8 + n_head])["__metadata__"][META_KEY])
            meta.update(name=task)
            if distinct:
                q = tensors["queries"].float()
                tensors["queries"] = (q + torch.from_numpy(query_offset(rng, q.shape[1], norms))).to(torch.float16).contiguous()
                meta.update(version=2)
            meta["content_hash"] = content_hash(meta, tensors)
            data = st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
            h = meta["content_hash"]
        else:
            h = manifest["switches"][task]["content_hash"]
        fname = file_name(task, h)
        (files / fname).write_bytes(data)
        entries[task] = {"file": fname, "content_hash": h, "bytes": len(data)}
    body = {"format": "switchbank-bank", "version": 1, "generation": 1, "switches": entries}
    (dest / "manifest.json").write_text(json.dumps(body, indent=1, sort_keys=True))
    return dest


def demo_pngs_and_tasks():
    from bench.traffic import demo_pngs
    return demo_pngs()


def served(bank: Path, starts: int = 3) -> dict:
    """Start the real server on ``bank`` ``starts`` times: medians of time to ready, memory and
    Auto-Switch latency (one start on this noisy a machine can be off by a second or more), and
    every start's time to ready."""
    runs = [_served_once(bank) for _ in range(starts)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["ready_all_s"] = [r["ready_s"] for r in runs]
    return out


def _served_once(bank: Path, requests: int = 40) -> dict:
    import httpx
    pngs = demo_pngs_and_tasks()[:requests]  # made first: the first request must follow ready at once
    port = free_port()
    t0 = time.perf_counter()
    proc = start_server(bank, port, router_metric="cosine")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(port, proc, timeout=900)
        ready = time.perf_counter() - t0
        p = psutil.Process(proc.pid)
        rss_ready = p.memory_info().rss
        # a bank past the exact scan's limit is served exactly from ready while its IVF index builds
        built = {}
        watch = threading.Thread(target=_watch_router, args=(url, t0, built), daemon=True)
        watch.start()
        lat = []
        with httpx.Client(base_url=url, timeout=60) as c:
            for png_task in pngs:
                t1 = time.perf_counter()
                r = c.post("/v1/predict", files={"image": ("i.png", png_task[1])})
                lat.append(time.perf_counter() - t1)
                r.raise_for_status()
                if len(lat) == 1:  # what a first user waits for: ready, then a request on cold switches
                    first = time.perf_counter() - t0
        watch.join(900)
        return {"ready_s": ready, "first_answer_s": first, "router_built_s": built["s"], "rss_ready_mb": rss_ready / 2**20,
                "rss_after_mb": p.memory_info().rss / 2**20,
                "auto_switch_p50_ms": 1000 * statistics.median(lat), "auto_switch_p90_ms": 1000 * float(np.quantile(lat, 0.9))}
    finally:
        proc.terminate()
        proc.wait(30)


def _watch_router(url: str, t0: float, out: dict) -> None:
    """Seconds from ``t0`` until the server's router is not rebuilding, into out["s"]."""
    import httpx
    with httpx.Client(base_url=url, timeout=60) as c:
        while "switchbank_router_rebuilding 1.0" in c.get("/metrics").text:
            time.sleep(0.1)
    out["s"] = time.perf_counter() - t0


def in_process(bank: Path, nprobes: list[int]) -> dict:
    from bench.traffic import demo_images
    from switchbank.backbone import DEMO_ARCH, load_backbone
    from switchbank.bank import Bank
    from switchbank.engine import Engine
    from switchbank.routing import Router
    from switchbank.types import Combination

    backbone = load_backbone(DEMO_ARCH, device="cpu")
    t0 = time.perf_counter()
    eng = Engine(backbone, k=10, router_metric="cosine")
    eng.sync(Bank(bank))
    sync_s = time.perf_counter() - t0
    eng.router.join()  # the index a bank past the exact scan's limit ends with, built after the sync
    built_s = time.perf_counter() - t0
    images = demo_images()
    emb = torch.cat([eng.embed(torch.stack([backbone.preprocess(im) for _, im in images[i:i + 64]]))
                     for i in range(0, len(images), 64)])
    truth = [t for t, _ in images]
    counts = eng._query_counts()
    # inputs near synthetic switches' queries: a query of a random switch plus noise of a tenth of its norm
    rng = np.random.default_rng(1)
    names = [n for n in sorted(counts) if "-" in n] or sorted(counts)
    synth = []
    for name in rng.choice(names, size=min(2000, 20 * len(names)), replace=True):
        q = eng._queries_of(eng.switches[name]).float().numpy()  # as the file stores them: float16
        row = q[rng.integers(q.shape[0])]
        synth.append(row + 0.1 * np.linalg.norm(row) * rng.normal(size=row.shape).astype(np.float32) / np.sqrt(row.size))
    synth = np.stack(synth).astype(np.float32)

    # exact search over every example, streamed task by task in the router's own insertion order
    order = list(eng.router._tid)
    ref_demo, ref_synth = exact_counts(eng, order, emb), exact_counts(eng, order, synth)

    def agreement(router):
        a = np.mean([x == y for x, y in zip(ref_demo, router.counts(emb))])
        b = np.mean([x == y for x, y in zip(ref_synth, router.counts(synth))])
        return float(a), float(b)

    def accuracy(counts):
        tops = [max(sorted(c), key=lambda n: c[n]) for c in counts]
        return float(np.mean([top.split("-")[0] == t for top, t in zip(tops, truth)]))

    # a different batch of held-out images each call: repeating one batch keeps the lists it probes
    # in the CPU's caches, a best case (5-15% faster at 1,000 distinct switches)
    batches = itertools.cycle([emb[i:i + 16] for i in range(0, 16 * 20, 16)])
    x16 = torch.stack([backbone.preprocess(im) for _, im in images[:16]])
    fwd = _median_time(lambda: eng.embed(x16), 7)
    knn = _median_time(lambda: eng.router.counts(next(batches)), 20)
    sample = order[:min(len(order), 20_000 // 100)]  # exact search time, per 20,000 vectors
    exact = Router(backbone.embed_dim, 10, "cosine", exact_max=1 << 62)
    exact.load(lambda names: eng._query_source(sample), {n: counts[n] for n in sample})
    knn_exact = _median_time(lambda: exact.counts(next(batches)), 5) * sum(counts.values()) / max(1, len(exact))
    out = {"sync_s": sync_s, "router_built_s": built_s, "router": eng.router.stats(), "forward_batch16_ms": 1000 * fwd,
           "knn_batch16_ms": 1000 * knn, "knn_over_forward": knn / fwd, "exact_knn_batch16_ms_estimated": 1000 * knn_exact,
           "agreement_demo": agreement(eng.router)[0], "agreement_synthetic": agreement(eng.router)[1],
           "accuracy_exact": accuracy(ref_demo), "accuracy_served": accuracy(eng.router.counts(emb))}
    if eng.router.kind == "approximate" and nprobes:
        sweep, default = [], eng.router._index.index.nprobe
        for p in nprobes:
            eng.router._index.index.nprobe = p
            t = _median_time(lambda: eng.router.counts(next(batches)), 10)
            a, b = agreement(eng.router)
            sweep.append({"nprobe": p, "knn_batch16_ms": 1000 * t, "agreement_demo": a, "agreement_synthetic": b,
                          "accuracy": accuracy(eng.router.counts(emb))})
            print("  nprobe", sweep[-1], flush=True)
        eng.router._index.index.nprobe = default
        out["nprobe_sweep"] = sweep
    # cold switches: load the bits and merge, against merging with the bits resident (medians of 5)
    colds, warms = [], []
    for name in names[-5:]:
        sw = eng.switches[name]
        combo = Combination.of({name: 1}, {name: sw.content_hash})
        t1 = time.perf_counter()
        eng.materialise(combo, eng.switches)
        colds.append(time.perf_counter() - t1)
        with eng.resident.use([sw]):
            warms.append(_median_time(lambda: eng.materialise(combo, eng.switches), 3))
    cold, warm = statistics.median(colds), statistics.median(warms)
    out.update(cold_load_and_merge_ms=1000 * cold, merge_resident_ms=1000 * warm, cold_over_resident=cold / warm)
    return out


def exact_counts(eng, order: list[str], x, k: int = 10) -> list[dict[str, int]]:
    """Per row of ``x``, the tasks of its k nearest query examples by exact search over every
    example (ties to the earlier example), streamed one task at a time so that no second index of
    the whole bank is held."""
    q = torch.from_numpy(eng.router.prepare(x))
    best_d = torch.full((q.shape[0], k), float("inf"))
    best_p = torch.full((q.shape[0], k), -1, dtype=torch.int64)
    owner, pos = [], 0
    for task, emb in eng._query_source(order):
        v = torch.from_numpy(eng.router.prepare(emb))
        d = -(q @ v.T) if eng.router.metric == "cosine" else (v * v).sum(1) - 2 * (q @ v.T)
        p = torch.arange(pos, pos + v.shape[0]).expand(q.shape[0], -1)
        owner.extend([task] * v.shape[0])
        pos += v.shape[0]
        d, p = torch.cat([best_d, d], 1), torch.cat([best_p, p], 1)
        # order by (distance, position): a stable sort on position, then on distance
        by_pos = torch.argsort(p, dim=1, stable=True)
        d, p = d.gather(1, by_pos), p.gather(1, by_pos)
        by_d = torch.argsort(d, dim=1, stable=True)[:, :k]
        best_d, best_p = d.gather(1, by_d), p.gather(1, by_d)
    return count_owners(best_p.tolist(), owner)


def _median_time(fn, n: int) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--nprobe", default="8,16,32,64,128")
    ap.add_argument("--modes", default="distinct,copies",
                    help="distinct: query embeddings moved per switch; copies: renamed copies keeping them")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    nprobes = [int(p) for p in args.nprobe.split(",") if p]
    results = {"demo_bank": {"served": served(DEMO)}}
    print("demo bank", results["demo_bank"], flush=True)
    base_rss = results["demo_bank"]["served"]["rss_after_mb"]
    rows = []
    for mode, n in ((m, n) for m in args.modes.split(",") for n in sizes):
        tmp = Path(tempfile.mkdtemp(prefix=f"switchbank-scale-{n}-"))
        try:
            t0 = time.perf_counter()
            bank = synth_bank(n, tmp / "bank", distinct=mode == "distinct")
            made = time.perf_counter() - t0
            disk = sum(p.stat().st_size for p in (bank / "switches").iterdir())
            srv = served(bank)
            print(n, "served", srv, flush=True)
            inp = in_process(bank, nprobes if n == max(sizes) and mode == "distinct" else [])
            print(n, "in process", {k: v for k, v in inp.items() if k != "nprobe_sweep"}, flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results[f"{mode}-{n}"] = {"switches": n, "mode": mode, "synthesised_s": made, "bank_bytes": disk, "served": srv,
                                  **inp}
        r = inp["router"]
        rows.append([f"{n:,} {mode}", f"{disk / 2**30:.2f} GiB",
                     f"{srv['ready_s']:.1f} s ({min(srv['ready_all_s']):.1f}-{max(srv['ready_all_s']):.1f}) / "
                     f"{srv['first_answer_s']:.1f} s / {srv['router_built_s']:.1f} s",
                     f"{srv['rss_after_mb'] - base_rss:+.0f} MB",
                     f"{r['kind']} ({r['distinct_vectors']:,} distinct vectors, {r['bytes'] / 2**20:.0f} MiB)",
                     f"{inp['knn_batch16_ms']:.2f} ms", f"{inp['knn_over_forward']:.1%}",
                     f"{inp['agreement_demo']:.2%} / {inp['agreement_synthetic']:.2%}",
                     f"{inp['accuracy_served']:.2%} ({inp['accuracy_exact']:.2%})",
                     f"{srv['auto_switch_p50_ms']:.0f} ms", f"{inp['cold_over_resident']:.2f}x"])
    table = md_table(["switches", "on disk", "start to ready (range) / to first answer / to the router's final index, medians of 3 starts", "memory beyond the demo server", "router index",
                      "k-NN, batch of 16", "k-NN / forward", "weights equal to exact (demo / synthetic)",
                      "demo routing accuracy (exact)", "Auto-Switch p50 over HTTP", "cold switch / resident merge"], rows)
    demo = results["demo_bank"]["served"]
    md = ["# A bank of thousands of switches\n", table, "",
          f"The six-switch demo bank, for reference: ready in {demo['ready_s']:.1f} s (first answer at "
          f"{demo['first_answer_s']:.1f} s), {demo['rss_after_mb']:.0f} MB "
          f"resident, Auto-Switch p50 {demo['auto_switch_p50_ms']:.0f} ms over HTTP."]
    top = results.get(f"distinct-{max(sizes)}", {})
    sweep = top.get("nprobe_sweep")
    if sweep:
        md += ["", f"nprobe at {max(sizes):,} distinct switches (the default is {top['router'].get('nprobe')}):", "",
               md_table(["nprobe", "k-NN, batch of 16", "weights equal to exact (demo)", "(synthetic)", "demo accuracy"],
                        [[p["nprobe"], f"{p['knn_batch16_ms']:.2f} ms", f"{p['agreement_demo']:.2%}",
                          f"{p['agreement_synthetic']:.2%}", f"{p['accuracy']:.2%}"] for p in sweep])]
    md += ["", "Rerun: `python -m bench.scale`."]
    print("\n".join(md))
    write("scale", {"results": results}, "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
