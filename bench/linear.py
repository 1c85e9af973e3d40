"""The linear kernels the engine can use on CPU, on the shapes of its towers.

    python -m bench.linear

torch.addmm (what F.linear, and so the plain forward, runs: MKL's sgemm, then the bias) against
oneDNN's matmul with the bias fused (what the mixed forward runs on fp32 CPU towers), on
ViT-B-32's linear shapes for a batch of 16 images (800 token rows) and on the demo tower's largest
pointwise convolutions (rows are pixels), in interleaved rounds. Each row also times the same
product split into the 8 groups of a typical mixed batch, whose sizes repeat (oneDNN compiles a
kernel per shape once; the first call of each shape is left out as warm-up).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from bench.common import interleaved, md_table, paired, summary, write
from switchbank import onednn

SHAPES = {  # name: (rows, in, out)
    "ViT-B-32 attention in-projection": (800, 768, 2304),
    "ViT-B-32 MLP up": (800, 768, 3072),
    "ViT-B-32 MLP down": (800, 3072, 768),
    "ViT-B-32 attention out-projection": (800, 768, 768),
    "demo tower, 1x1 conv 320->1280 (4x4 px)": (256, 320, 1280),
    "demo tower, 1x1 conv 24->144 (32x32 px)": (16384, 24, 144),
}
GROUPS = [4, 2, 2, 1, 3, 1, 2, 1]  # images per group in a batch of 16: the demo traffic's typical split


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    if onednn.LINEAR is None:
        print("this torch build has no oneDNN matmul; nothing to compare")
        return 1
    g = torch.Generator().manual_seed(0)
    rows_out, results = [], []
    for name, (n, k, m) in SHAPES.items():
        x, w, b = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(m, generator=g)
        per = n // 16
        spans, s = [], 0
        for size in GROUPS:
            spans.append((s * per, (s + size) * per))
            s += size

        def grouped(fn):
            def run():
                out = x.new_empty((n, m))
                for lo, hi in spans:
                    out[lo:hi] = fn(x[lo:hi])
            return run

        addmm = lambda xs: F.linear(xs, w, b)  # noqa: E731
        dnn = lambda xs: onednn.linear(xs, w, b)  # noqa: E731
        paths = {"addmm": lambda: addmm(x), "oneDNN": lambda: dnn(x),
                 "addmm, 8 groups": grouped(addmm), "oneDNN, 8 groups": grouped(dnn)}
        with torch.inference_mode():
            times = interleaved(paths, args.repeats, 5, warmup=2)
        med = {p: summary(t)["median"] for p, t in times.items()}
        whole = paired(times["addmm"], times["oneDNN"])  # addmm time / oneDNN time, per round
        split = paired(times["addmm, 8 groups"], times["oneDNN, 8 groups"])
        rows_out.append([name, f"{n}x{k} @ {k}x{m}", med["addmm"] * 1e3, med["oneDNN"] * 1e3, whole,
                         med["addmm, 8 groups"] * 1e3, med["oneDNN, 8 groups"] * 1e3, split])
        results.append({"shape": name, "rows": n, "in": k, "out": m, "median_ms": {p: v * 1e3 for p, v in med.items()},
                        "onednn_speedup_whole": whole, "onednn_speedup_8_groups": split})
    headers = ["shape", "product", "addmm ms", "oneDNN ms", "oneDNN speed-up", "addmm, 8 groups ms",
               "oneDNN, 8 groups ms", "speed-up, 8 groups"]
    table = md_table(headers, rows_out)
    print(table)
    write("perf-linear", {"results": results}, "# Linear kernels on CPU\n\n" + table +
          "\n\nSpeed-up: the median over rounds of (addmm time / oneDNN time) within a round. "
          "Rerun: `python -m bench.linear`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
