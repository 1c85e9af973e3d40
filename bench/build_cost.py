"""Building cached towers apart from the forward: the demo's mixed traffic with towers built on a
thread of their own (now) or on the engine's thread (before).

    python -m bench.build_cost [--processes 4]

On the demo's Auto-Switch stream (the shuffled held-out images, batches of 16, the server's default
engine settings) a mix becomes hot and its tower is built in the middle of serving, between two
forwards: 36 of the 50 measured batches here build one. Each way serves the stream in fresh
processes (what one process leaves in its heap changes the next figure), alternating the two ways,
``--processes`` each: 10 batches of warm-up, then 50 measured. Reported per process: the mean time
of a measured batch, the same over the median router pass (the pretrained tower alone, timed in the
same process), the towers built and their median build time, and the page faults taken by the
forwards (memory newly touched while serving).
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=4, help="fresh processes per way, alternating")
    ap.add_argument("--one", choices=("apart", "inline"), help=argparse.SUPPRESS)  # internal: one process's run
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(serve_stream(args.one)))
        return 0
    runs = []
    for i in range(args.processes):
        for mode in (("inline", "apart") if i % 2 == 0 else ("apart", "inline")):
            done = subprocess.run([sys.executable, "-m", "bench.build_cost", "--one", mode],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    label = {"inline": "on the engine's thread (before)", "apart": "on a thread of its own (now)"}
    rows, summary = [], {}
    for mode in ("inline", "apart"):
        mine = [r for r in runs if r["mode"] == mode]
        med = {k: statistics.median(r[k] for r in mine) for k in
               ("batch_ms", "batch_over_router_pass", "towers_built", "build_ms_median", "forward_page_faults")}
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
