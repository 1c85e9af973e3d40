"""Cold materialisation of a combination against one clone of the base image tower.

    python -m bench.materialise [--workloads A,B] [--repeats 7]

Each round times, back to back, a clone of the base tower and the merge of 1, 2 and 5 switches,
with the fused CPU kernel (what the server runs on fp32 CPU towers) and with torch ops (what it
runs elsewhere). Every ratio is computed within its round and the median over rounds is reported,
so a slow moment of the machine weighs on both sides of a ratio alike. Interleaving also means the
clone, like a real miss that follows forward passes, does not find the tower in a warm cache.
"""

from __future__ import annotations

import argparse
import sys

from bench.common import interleaved, md_table, paired, summary, write
from bench.workloads import WORKLOADS
from switchbank import fused
from switchbank.combine import merged_params


def bench_workload(w, sizes, repeats):
    base = w.backbone.params
    names = list(w.switches)
    cases = {"clone": lambda: {k: v.clone() for k, v in base.items()}}
    for path, kernel in (("fused", True), ("torch ops", False)):
        if kernel and not fused.supports(base.values()):
            continue
        for n in sizes:
            weighted = [(w.switches[names[i]], 1.0 / n) for i in range(n)]
            cases[(path, n)] = lambda kernel=kernel, weighted=weighted: merged_params(base, weighted, kernel=kernel)
    times = interleaved(cases, repeats)  # one call per sample: repeating would warm the cache
    clone = times["clone"]
    c = summary(clone)
    rows = [["clone of the base tower", "", c["median"] * 1000, (c["p75"] - c["p25"]) * 1000, 1.0, ""]]
    results = [{"what": "clone", "seconds": c}]
    for key in cases:
        if key == "clone":
            continue
        path, n = key
        s = summary(times[key])
        r = paired(times[key], clone)
        # the cost of each switch beyond the first, in clones
        extra = None if n == sizes[0] else (r - paired(times[(path, sizes[0])], clone)) / (n - sizes[0])
        rows.append([f"{n} switch{'es' if n > 1 else ''}", path, s["median"] * 1000, (s["p75"] - s["p25"]) * 1000,
                     r, "" if extra is None else extra])
        results.append({"what": f"{n} switches", "path": path, "switches": n, "seconds": s, "vs_clone": r,
                        "vs_clone_per_round": [a / b for a, b in zip(times[key], clone)],
                        "extra_per_switch_vs_clone": extra})
    return rows, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="A,B")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    payload, md = {"kernel": "fused" if fused.AVAILABLE else "torch ops only"}, []
    for key in args.workloads.split(","):
        w = WORKLOADS[key]()
        sizes = [n for n in (1, 2, 5) if n <= len(w.switches)]
        rows, results = bench_workload(w, sizes, args.repeats)
        payload[key] = {"workload": w.name, "results": results}
        table = md_table(["materialise", "path", "median ms", "IQR ms", "x clone", "+ per further switch"], rows)
        md.append(f"## Workload {w.name}\n\n{table}\n")
        print(f"\nWorkload {w.name}\n{table}", flush=True)
    write("perf-materialise", payload, "# Cold materialisation\n\n" + "\n".join(md) +
          "\n`x clone` is the median over rounds of (merge time / clone time in the same round); "
          "`+ per further switch` is (x clone at n - x clone at 1) / (n - 1).\n"
          "Targets: 1 switch at most 2x a clone; each further switch at most 1x more. "
          "The server uses the fused path on fp32 CPU towers and torch ops elsewhere.\n"
          "Rerun: `python -m bench.materialise`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
