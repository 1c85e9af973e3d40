"""On-disk bits per parameter against the entropy bound, and resident memory of a loaded bank.

    python -m bench.storage
"""

from __future__ import annotations

import argparse
import math
import sys

from bench.common import md_table, write
from bench.workloads import synthetic_finetune
from switchbank.backbone import load_backbone
from switchbank.build import build_switch
from switchbank.format import describe, from_bytes, to_bytes


def entropy_bound(alpha: float) -> float:
    p = 1 - alpha
    h = -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) if 0 < p < 1 else 0.0
    return h + p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--alphas", default="0.5,0.6,0.7,0.8,0.9")
    args = ap.parse_args(argv)
    backbone = load_backbone(args.arch, device="cpu")
    tower = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    fin = synthetic_finetune(tower, seed=0)
    rows, results = [], []
    for a in (float(x) for x in args.alphas.split(",")):
        sw = build_switch(tower, fin, "s", a)
        data = to_bytes(sw)
        back = from_bytes(data)
        info = describe(back, len(data))
        bound = entropy_bound(a)
        resident = 8 * back.resident_bytes() / back.n_params
        rows.append([a, info["bits_per_param"], info["file_bits_per_param"], bound, info["bits_per_param"] / bound, resident])
        results.append({"alpha": a, "bits_per_param": info["bits_per_param"], "file_bits_per_param": info["file_bits_per_param"],
                        "entropy_bound": bound, "ratio_to_bound": info["bits_per_param"] / bound,
                        "resident_bits_per_param": resident, "parameters": back.n_params})
    table = md_table(["alpha", "switch bits/param", "file bits/param", "entropy bound", "x bound", "resident bits/param"], rows)
    print(table)
    write("perf-storage", {"arch": args.arch, "results": results},
          f"# Storage ({args.arch}, synthetic heavy-tailed task vectors)\n\n{table}\n\n"
          "Targets: at most 1.1x the entropy bound H(1 - alpha) + (1 - alpha); resident at most 2.1 bits/param.\n"
          "Rerun: `python -m bench.storage`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
