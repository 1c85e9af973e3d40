"""Building cached towers apart from the forward: the demo's mixed traffic with towers built on a
thread of their own (now) or on the engine's thread (before). With ``--loads``, the same question
for loading a cold switch's bits, which stays on the engine's thread.

    python -m bench.build_cost [--processes 4] [--loads]

On the demo's Auto-Switch stream (the shuffled held-out images, batches of 16, the server's default
engine settings) a mix becomes hot and its tower is built in the middle of serving, between two
forwards: 36 of the 50 measured batches here build one. Each way serves the stream in fresh
processes (what one process leaves in its heap changes the next figure), alternating the two ways,
``--processes`` each: 10 batches of warm-up, then 50 measured. Reported per process: the mean time
of a measured batch, the same over the median router pass (the pretrained tower alone, timed in the
same process), the towers built and their median build time, and the page faults taken by the
forwards (memory newly touched while serving).

``--loads``: a bank of 300 switches (renamed copies of the demo ones) under a resident budget of
40 MB (about 45 switches' bits), batches of 16 held-out images naming 4 switches drawn at random,
so that nearly every batch loads cold switches; towers are never cached, so only the loads differ.
The bits are decoded on the engine's thread (now) or on a thread that ends with the load. Reported
per process: the median and mean batch, the loads, their mean time, and the page faults of the
whole process while serving the measured batches and of the loads alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from bench.common import md_table, write

BATCH, WARMUP, MEASURED = 16, 10, 50


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def serve_stream(mode: str) -> dict:
    """One process's figures; ``mode`` "inline" builds towers on the calling thread, as before."""
    import torch

    from bench.traffic import demo_images
    from bench.workloads import workload_b
    from switchbank.engine import Route

    w = workload_b()
    eng = w.engine(cache_bytes=2 << 30)  # the server's defaults otherwise (Settings)
    if mode == "inline":
        eng.materialise = eng._materialise
    builds, forward = [], {"faults": 0}
    eng.on_materialise = builds.append
    run_forward = eng.backbone.forward_mixed

    def counted(*args):
        f0 = _faults()
        try:
            return run_forward(*args)
        finally:
            forward["faults"] += _faults() - f0

    eng.backbone.forward_mixed = counted
    xs = torch.stack([w.backbone.preprocess(im) for _, im in demo_images()])
    batches = [xs[i:i + BATCH] for i in range(0, (WARMUP + MEASURED) * BATCH, BATCH)]
    for x in batches[:WARMUP]:
        eng.run(x, [Route()] * BATCH)

    def router_pass() -> list[float]:
        out = []
        for x in batches[:WARMUP]:
            t0 = time.perf_counter()
            eng.embed(x)
            out.append(time.perf_counter() - t0)
        return out

    base = router_pass()
    del builds[:]
    forward["faults"] = 0
    t0 = time.perf_counter()
    for x in batches[WARMUP:]:
        eng.run(x, [Route()] * BATCH)
    mean = (time.perf_counter() - t0) / MEASURED
    faults = forward["faults"]
    base += router_pass()
    router = statistics.median(base)
    return {"mode": mode, "batch_ms": mean * 1e3, "router_pass_ms": router * 1e3, "batch_over_router_pass": mean / router,
            "towers_built": len(builds), "build_ms_median": statistics.median(builds) * 1e3 if builds else None,
            "forward_page_faults": faults}


def alternating(processes: int, args_of) -> list[dict]:
    """Each way ("inline", "apart") in ``processes`` fresh processes of this module, alternating
    which goes first; ``args_of(mode)``: the arguments of one such run. Their figures, in order."""
    runs = []
    for i in range(processes):
        for mode in (("inline", "apart") if i % 2 == 0 else ("apart", "inline")):
            done = subprocess.run([sys.executable, "-m", "bench.build_cost", *args_of(mode)],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    return runs


def medians(runs: list[dict], mode: str, keys) -> tuple[list[dict], dict]:
    """The runs of one way, and the median of each of ``keys`` over them."""
    mine = [r for r in runs if r["mode"] == mode]
    return mine, {k: statistics.median(r[k] for r in mine) for k in keys}


LOAD_BUDGET, LOAD_BANK, LOAD_PICKS = 40 << 20, 300, 4


def serve_loads(mode: str, bank: str) -> dict:
    """One process's figures for cold switch loads; ``mode`` "apart" loads on a thread of its own."""
    import random

    import torch

    from bench.traffic import demo_images
    from switchbank import arena
    from switchbank import resident as residency
    from switchbank.backbone import DEMO_ARCH, load_backbone
    from switchbank.bank import Bank
    from switchbank.engine import Engine, Route

    loading = {"faults": 0, "seconds": 0.0}
    load = residency.load_bits

    def counted(sw):  # the loading thread's own faults
        f0, t0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt, time.perf_counter()
        load(sw)
        loading["faults"] += resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0
        loading["seconds"] += time.perf_counter() - t0

    residency.load_bits = (lambda sw: arena.run_apart(counted, sw)) if mode == "apart" else counted
    backbone = load_backbone(DEMO_ARCH, device="cpu")
    eng = Engine(backbone, k=10, cache_bytes=2 << 30, router_metric="cosine", hot_after=0, hot_mix_after=0,
                 resident_bytes=LOAD_BUDGET)
    eng.sync(Bank(bank))
    names = sorted(eng.switches)
    images = [im for _, im in demo_images()][:20 * BATCH]
    xs = torch.stack([backbone.preprocess(im) for im in images])
    rng = random.Random(1)

    def batch(i: int):
        picks = [rng.choice(names) for _ in range(LOAD_PICKS)]
        at = (i * BATCH) % len(xs)
        return xs[at:at + BATCH], [Route(task=picks[j % LOAD_PICKS]) for j in range(BATCH)]

    for i in range(WARMUP):
        eng.run(*batch(i))
    loads0, times = eng.resident.loads, []
    loading.update(faults=0, seconds=0.0)
    f0 = _faults()
    for i in range(WARMUP, WARMUP + MEASURED):
        x, routes = batch(i)
        t0 = time.perf_counter()
        eng.run(x, routes)
        times.append(time.perf_counter() - t0)
    loads = eng.resident.loads - loads0
    return {"mode": mode, "batch_ms": statistics.median(times) * 1e3, "batch_ms_mean": statistics.mean(times) * 1e3,
            "loads": loads, "load_ms_mean": loading["seconds"] / max(1, loads) * 1e3,
            "page_faults": _faults() - f0, "load_page_faults": loading["faults"]}


def compare_loads(processes: int) -> None:
    import tempfile
    from pathlib import Path

    from bench.scale import synth_bank

    with tempfile.TemporaryDirectory() as tmp:
        bank = synth_bank(LOAD_BANK, Path(tmp) / "bank", distinct=False)
        runs = alternating(processes, lambda mode: ["--one-load", mode, "--bank", str(bank)])
    label = {"inline": "on the engine's thread (now)", "apart": "on a thread of its own"}
    keys = ("batch_ms", "batch_ms_mean", "loads", "load_ms_mean", "page_faults", "load_page_faults")
    rows, summary = [], {}
    for mode in ("inline", "apart"):
        mine, med = medians(runs, mode, keys)
        summary[mode] = med
        rows.append([label[mode], len(mine), med["batch_ms"], " / ".join(f"{r['batch_ms']:.0f}" for r in mine),
                     med["batch_ms_mean"], round(med["loads"]), med["load_ms_mean"], round(med["page_faults"]),
                     round(med["load_page_faults"])])
    table = md_table(["where bits are loaded", "processes", "ms per batch (median)", "per process", "mean ms per batch",
                      "loads", "ms per load", "page faults while serving", "of them in the loads"], rows)
    print("\n" + table)
    write("load-cost", {"batch": BATCH, "warmup_batches": WARMUP, "measured_batches": MEASURED, "bank": LOAD_BANK,
                        "resident_budget": LOAD_BUDGET, "switches_per_batch": LOAD_PICKS, "runs": runs, "medians": summary},
          "# Loading cold switches on the engine's thread or apart\n\n"
          f"{LOAD_BANK} renamed copies of the demo switches, resident budget {LOAD_BUDGET >> 20} MB, batches of "
          f"{BATCH} held-out images naming {LOAD_PICKS} switches drawn at random, no cached towers: {WARMUP} batches "
          f"of warm-up, then {MEASURED} measured, in fresh processes alternating the two ways. Medians over "
          "processes.\n\n" + table + "\n\nRerun: `python -m bench.build_cost --loads`.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=4, help="fresh processes per way, alternating")
    ap.add_argument("--loads", action="store_true", help="cold switch loads instead of tower builds")
    ap.add_argument("--one", choices=("apart", "inline"), help=argparse.SUPPRESS)  # internal: one process's run
    ap.add_argument("--one-load", choices=("apart", "inline"), help=argparse.SUPPRESS)
    ap.add_argument("--bank", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(serve_stream(args.one)))
        return 0
    if args.one_load:
        print(json.dumps(serve_loads(args.one_load, args.bank)))
        return 0
    if args.loads:
        compare_loads(args.processes)
        return 0
    runs = alternating(args.processes, lambda mode: ["--one", mode])
    label = {"inline": "on the engine's thread (before)", "apart": "on a thread of its own (now)"}
    keys = ("batch_ms", "batch_over_router_pass", "towers_built", "build_ms_median", "forward_page_faults")
    rows, summary = [], {}
    for mode in ("inline", "apart"):
        mine, med = medians(runs, mode, keys)
        summary[mode] = med
        rows.append([label[mode], len(mine), med["batch_ms"], " / ".join(f"{r['batch_ms']:.0f}" for r in mine),
                     med["batch_over_router_pass"], round(med["towers_built"]), med["build_ms_median"],
                     round(med["forward_page_faults"])])
    table = md_table(["where towers are built", "processes", "ms per batch (median)", "per process", "batch / router pass",
                      "towers built", "build ms", "page faults in the forwards"], rows)
    print("\n" + table)
    write("build-cost", {"batch": BATCH, "warmup_batches": WARMUP, "measured_batches": MEASURED, "runs": runs,
                         "medians": summary},
          "# Building cached towers apart from the forward\n\n"
          f"Demo tower and bank, Auto-Switch on the shuffled held-out images, batches of {BATCH}: {WARMUP} "
          f"batches of warm-up, then {MEASURED} measured, in fresh processes alternating the two ways. "
          "Medians over processes.\n\n" + table + "\n\nRerun: `python -m bench.build_cost`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
