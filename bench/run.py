"""The whole performance suite, then one combined report: bench/results/perf-<machine>.{json,md}.

    python -m bench.run            # forward (single and mixed), linear, materialise, storage, http
    python -m bench.run --quick    # fewer repeats and requests
"""

from __future__ import annotations

import argparse
import json
import sys

from bench import forward, http, linear, materialise, storage
from bench.common import RESULTS, machine, machine_tag


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    reps = ["--repeats", "3" if args.quick else "7"]
    forward.main(reps)
    linear.main([])
    materialise.main(reps)
    storage.main([])
    http.main(["--requests", "150" if args.quick else "400"])
    tag = machine_tag()
    parts = {p: json.loads((RESULTS / f"perf-{p}-{tag}.json").read_text())
             for p in ("forward", "mixed", "linear", "materialise", "storage", "http")}
    (RESULTS / f"perf-{tag}.json").write_text(json.dumps({"machine": machine(), **parts}, indent=1) + "\n")
    md = "\n\n".join((RESULTS / f"perf-{p}-{tag}.md").read_text() for p in parts)
    (RESULTS / f"perf-{tag}.md").write_text(md)
    print(f"wrote {RESULTS / f'perf-{tag}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
