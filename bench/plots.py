"""Plots of the committed results, for docs/performance.md.

    python -m bench.plots

Reads bench/results/perf-mixed-<machine>.json and scale-<machine>.json and writes
bench/results/mixed-traffic.png and bench/results/scale.png.
"""

from __future__ import annotations

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import RESULTS, machine_tag  # noqa: E402
from bench.forward import ENGINE_BASE  # noqa: E402


def mixed_traffic(forward: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, key in zip(axes, ("A", "B")):
        part = forward.get(key)
        if not part:
            continue
        cases = [r for r in part["results"] if r["case"] not in ("plain forward", ENGINE_BASE)]
        base = next((r["throughput_vs_plain"] for r in part["results"] if r["case"] == ENGINE_BASE), None)
        labels = [r["case"].replace("before: one forward per combination, every combination cached",
                                    "before: a forward per combination")
                  .replace(" (default)", "\n(default)") for r in cases]
        values = [r["throughput_vs_plain"] for r in cases]
        bars = ax.barh(range(len(cases)), values, color=["#999"] + ["#3b7dd8"] * (len(cases) - 1))
        ax.set_yticks(range(len(cases)), labels, fontsize=8)
        ax.axvline(1.0, color="#444", lw=0.8, label="plain open_clip forward")
        if base is not None:
            ax.axvline(base, color="#c33", lw=0.8, ls="--", label="base weights on the engine's kernels")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_xlim(0, max(values + [base or 0, 1.0]) * 1.25)
        ax.set_xlabel("throughput / plain open_clip forward (same batches)", fontsize=8)
        title = "A: ViT-B-32, weights following the demo mixes" if key == "A" else "B: demo tower, Auto-Switch"
        ax.set_title(title, fontsize=9)
        for b, v in zip(bars, values):
            ax.text(v, b.get_y() + b.get_height() / 2, f" {v:.2f}x", va="center", fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("Shuffled mixed traffic, batches of 16 (CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "mixed-traffic.png", dpi=120)


def scale(results: dict) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for mode, marker in (("distinct", "o"), ("copies", "s")):
        rows = sorted((v for v in results.values() if isinstance(v, dict) and v.get("mode") == mode),
                      key=lambda v: v["switches"])
        if not rows:
            continue
        n = [r["switches"] for r in rows]
        axes[0].plot(n, [r["served"]["ready_s"] for r in rows], marker=marker, label=mode)
        axes[1].plot(n, [100 * r["knn_over_forward"] for r in rows], marker=marker, label=mode)
        axes[2].plot(n, [r["served"]["rss_after_mb"] for r in rows], marker=marker, label=mode)
    for ax, title in zip(axes, ("seconds from start to ready", "k-NN, % of the forward (batch 16)",
                                "server resident memory, MB")):
        ax.set_xscale("log")
        ax.set_xlabel("switches in the bank")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=120)


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    tag = machine_tag()
    mixed = RESULTS / f"perf-mixed-{tag}.json"
    if mixed.exists():
        mixed_traffic(json.loads(mixed.read_text()))
    sc = RESULTS / f"scale-{tag}.json"
    if sc.exists():
        scale(json.loads(sc.read_text())["results"])
    print("wrote plots into", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
