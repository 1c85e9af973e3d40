"""Cold materialisation of a combination against one clone of the base image tower.

    python -m bench.materialise [--workloads A,B] [--repeats 7]
"""

from __future__ import annotations

import argparse
import sys

from bench.common import md_table, summary, timeit, write
from bench.workloads import WORKLOADS
from switchbank.combine import merged_params


def bench_workload(w, sizes, repeats):
    base = w.backbone.params
    names = list(w.switches)
    clone = summary(timeit(lambda: {k: v.clone() for k, v in base.items()}, repeats))
    rows = [["clone of the base tower", clone["median"] * 1000, (clone["p75"] - clone["p25"]) * 1000, 1.0]]
    results = [{"what": "clone", "seconds": clone}]
    for n in sizes:
        weighted = [(w.switches[names[i]], 1.0 / n) for i in range(n)]
        t = summary(timeit(lambda: merged_params(base, weighted), repeats))
        ratio = t["median"] / clone["median"]
        rows.append([f"{n} switch{'es' if n > 1 else ''}", t["median"] * 1000, (t["p75"] - t["p25"]) * 1000, ratio])
        results.append({"what": f"{n} switches", "switches": n, "seconds": t, "vs_clone": ratio})
    return rows, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="A,B")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    payload, md = {}, []
    for key in args.workloads.split(","):
        w = WORKLOADS[key]()
        sizes = [n for n in (1, 2, 5) if n <= len(w.switches)]
        rows, results = bench_workload(w, sizes, args.repeats)
        payload[key] = {"workload": w.name, "results": results}
        table = md_table(["materialise", "median ms", "IQR ms", "x clone"], rows)
        md.append(f"## Workload {w.name}\n\n{table}\n")
        print(f"\nWorkload {w.name}\n{table}", flush=True)
    write("perf-materialise", payload, "# Cold materialisation\n\n" + "\n".join(md) +
          "\nTargets: 1 switch at most 2x a clone; each further switch at most 1x more.\n"
          "Rerun: `python -m bench.materialise`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
