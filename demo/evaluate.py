"""The paper's Table 2 and Fig. 7 for the demo setting, measured.

    python -m demo.evaluate [--alphas 0.0,0.1,...,0.9]

Runs the pipeline first if its checkpoints are missing (cached otherwise), evaluates every method on
each task's held-out test split, and writes bench/results/table2.{md,json} and
bench/results/alpha-sweep.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from demo.common import ROOT, WORK, accuracy, embed, logits, to_tensor
from demo.pipeline import QUERIES, load_checkpoint, main as run_pipeline
from demo.tasks import LOADERS, load
from switchbank.backbone import DEMO_ARCH, load_backbone
from switchbank.baselines import METHODS
from switchbank.build import build_switch
from switchbank.combine import merged_params
from switchbank.format import describe, read_switch
from switchbank.routing import Router
from switchbank.types import Combination

RESULTS = ROOT / "bench" / "results"
K = 10
ROWS = ["Pretrained", "Individual", "Weight averaging", "Task arithmetic", "TIES", "DARE", "EMR",
        "Localize-and-Stitch", "T-Switch", "Auto-Switch"]
BASELINE_ROWS = {"Weight averaging": "weight_averaging", "Task arithmetic": "task_arithmetic", "TIES": "ties",
                 "DARE": "dare", "EMR": "emr", "Localize-and-Stitch": "localize_and_stitch"}


class Setting:
    """Everything the methods share: backbone, test tensors, heads, checkpoints, task vectors."""

    def __init__(self, work: Path, tasks: list[str]):
        self.backbone = load_backbone(DEMO_ARCH, device="cpu")
        self.tasks = tasks
        self.base = {k: v.detach().clone() for k, v in self.backbone.params.items()}
        self.x, self.y, self.heads, self.tuned = {}, {}, {}, {}
        for t in tasks:
            task = load(t)
            self.x[t] = to_tensor(self.backbone, task.test)
            self.y[t] = torch.tensor(task.test_labels)
            state, w, b, _ = load_checkpoint(work, t)
            self.tuned[t] = {k: state[k] for k in self.base}
            self.heads[t] = (w, b)
        self.tvs = {t: {k: self.tuned[t][k] - self.base[k] for k in self.base} for t in tasks}
        self.emb = {t: embed(self.backbone, self.x[t]) for t in tasks}  # router pass, shared by all alphas

    def acc(self, t: str, params=None) -> float:
        w, b = self.heads[t]
        return accuracy(self.backbone, self.x[t], self.y[t], w, b, params)


def switches_for(s: Setting, alpha: float, work: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for t in s.tasks:
        q = load_file(str(work / t / "queries.safetensors"))["embeddings"]
        out[t] = build_switch(s.base, s.tuned[t], t, alpha, queries=q, router_fingerprint=s.backbone.fingerprint)
    return out


def tswitch(s: Setting, sws: dict) -> dict[str, float]:
    return {t: s.acc(t, merged_params(s.base, [(sws[t], 1.0)])) for t in s.tasks}


def autoswitch(s: Setting, sws: dict, metric: str = "l2") -> tuple[dict[str, float], float, dict[str, float]]:
    """(accuracy with the true task's head as in the paper, routing accuracy, accuracy with the
    top-weighted switch's head as the server answers)."""
    router = Router(s.backbone.embed_dim, K, metric)
    for t in s.tasks:
        router.add(t, sws[t].queries)
    hashes = {t: sws[t].content_hash for t in s.tasks}
    acc, acc_top, routed, total = {}, {}, 0, 0
    for t in s.tasks:
        combos = [Combination.of(w, hashes) for w in router.weights(s.emb[t])]
        groups = defaultdict(list)
        for i, c in enumerate(combos):
            groups[c].append(i)
        correct = correct_top = 0
        for c, idx in groups.items():
            params = merged_params(s.base, [(sws[n], float(w)) for n, _, w in c.terms])
            feats = embed(s.backbone, s.x[t][idx], params)
            y = s.y[t][idx]
            correct += int((logits(feats, *s.heads[t]).argmax(1) == y).sum())
            top = c.top()
            if top == t:
                routed += len(idx)
                correct_top += int((logits(feats, *s.heads[t]).argmax(1) == y).sum())
            # a misrouted request gets another task's labels: wrong by construction
        acc[t] = 100 * correct / len(s.y[t])
        acc_top[t] = 100 * correct_top / len(s.y[t])
        total += len(s.y[t])
    return acc, 100 * routed / total, acc_top


def table(s: Setting, work: Path, alpha: float) -> dict:
    rows: dict[str, dict[str, float]] = {}
    rows["Pretrained"] = {t: s.acc(t) for t in s.tasks}
    rows["Individual"] = {t: s.acc(t, s.tuned[t]) for t in s.tasks}
    for row, key in BASELINE_ROWS.items():
        per_task = METHODS[key](s.base, s.tvs)
        rows[row] = {t: s.acc(t, per_task[t]) for t in s.tasks}
    files = {t: work / t / f"switch-{alpha}.safetensors" for t in s.tasks}
    sws = {t: read_switch(f) for t, f in files.items()}  # the files the CLI built
    rows["T-Switch"] = tswitch(s, sws)
    rows["Auto-Switch"], routing, top_head = autoswitch(s, sws)
    rows["Auto-Switch (top-weighted head, as served)"] = top_head
    rows["Auto-Switch, cosine routing"], routing_cos, top_cos = autoswitch(s, sws, "cosine")
    rows["Auto-Switch, cosine routing (top-weighted head, as served)"] = top_cos
    n = sum(v.numel() for v in s.base.values())
    fp32_tvs = 4 * n * len(s.tasks)
    switch_bytes = sum(describe(sw)["switch_bytes"] for sw in sws.values())
    query_bytes = sum(sw.queries.numel() * 4 for sw in sws.values())
    storage = {
        "Pretrained": 0, "Individual": fp32_tvs,
        **{r: 4 * n for r in BASELINE_ROWS},  # one merged fp32 tower
        "EMR": 4 * n + len(s.tasks) * (n // 8 + 4),  # unified vector + a 1-bit mask and a scalar per task
        "T-Switch": switch_bytes, "Auto-Switch": switch_bytes + query_bytes,
    }
    for row in rows:
        if row.startswith("Auto-Switch"):
            storage[row] = switch_bytes + query_bytes
    return {"rows": rows, "routing_accuracy": routing, "routing_accuracy_cosine": routing_cos, "storage_bytes": storage, "fp32_task_vector_bytes": fp32_tvs,
            "parameters": n, "alpha": alpha, "file_bytes": {t: f.stat().st_size for t, f in files.items()}}


def sweep(s: Setting, work: Path, alphas: list[float]) -> list[dict]:
    out = []
    for a in alphas:
        t0 = time.time()
        sws = switches_for(s, a, work)
        ts = tswitch(s, sws)
        au, routing, _ = autoswitch(s, sws)
        bits = sum(describe(sw)["bits_per_param"] for sw in sws.values()) / len(sws)
        out.append({"alpha": a, "t_switch": ts, "auto_switch": au, "t_switch_avg": _avg(ts), "auto_switch_avg": _avg(au),
                    "routing_accuracy": routing, "bits_per_param": bits})
        print(f"alpha {a:.1f}: T-Switch {_avg(ts):6.2f}  Auto-Switch {_avg(au):6.2f}  "
              f"({bits:.3f} bits/param, {time.time() - t0:.0f} s)", flush=True)
    return out


def _avg(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def machine() -> dict:
    return {"machine": platform.node(), "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu"}


def render_table(res: dict, tasks: list[str]) -> str:
    head = "| method | " + " | ".join(tasks) + " | avg | storage MB | % of fp32 task vectors |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for row, accs in res["rows"].items():
        st = res["storage_bytes"].get(row, 0)
        pct = 100 * st / res["fp32_task_vector_bytes"]
        lines.append(f"| {row} | " + " | ".join(f"{accs[t]:.2f}" for t in tasks) + f" | **{_avg(accs):.2f}** | "
                     f"{st / 1e6:.2f} | {pct:.1f}% |")
    return "\n".join(lines)


def render_sweep(rows: list[dict]) -> str:
    lines = ["| alpha | T-Switch avg | Auto-Switch avg | routing acc | bits/param |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['alpha']:.1f} | {r['t_switch_avg']:.2f} | {r['auto_switch_avg']:.2f} | "
                     f"{r['routing_accuracy']:.2f} | {r['bits_per_param']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], individual: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(a, [r["t_switch_avg"] for r in rows], "o-", label="T-Switch")
    ax.plot(a, [r["auto_switch_avg"] for r in rows], "s-", label="Auto-Switch")
    ax.axhline(individual, color="gray", ls="--", label="Individual")
    ax.set_xlabel("discard ratio alpha")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("Discard-ratio sweep (demo tasks, EfficientNet-Lite0)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--alpha", type=float, default=0.6)
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps, if the pipeline must run")
    ap.add_argument("--alphas", default="0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--tasks", default=",".join(LOADERS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    run_pipeline(["--work", str(args.work), "--alpha", str(args.alpha), "--steps", str(args.steps),
                  "--tasks", ",".join(tasks)])
    torch.manual_seed(0)
    t0 = time.time()
    s = Setting(args.work, tasks)
    res = table(s, args.work, args.alpha)
    md = render_table(res, tasks)
    print(md)
    print(f"Auto-Switch routing accuracy: {res['routing_accuracy']:.2f}% (l2), {res['routing_accuracy_cosine']:.2f}% (cosine)")
    rows = sweep(s, args.work, [float(a) for a in args.alphas.split(",")])
    args.out.mkdir(parents=True, exist_ok=True)
    info = {**machine(), "seconds": round(time.time() - t0, 1), "k": K, "queries_per_task": QUERIES}
    (args.out / "table2.json").write_text(json.dumps({**res, **info}, indent=1) + "\n")
    (args.out / "table2.md").write_text(
        f"# Table 2, demo setting (alpha {args.alpha}, K {K}, {QUERIES} queries per task)\n\n{md}\n\n"
        f"Auto-Switch routing accuracy (top-weighted switch is the true task): {res['routing_accuracy']:.2f}% with "
        f"the paper's Euclidean k-NN, {res['routing_accuracy_cosine']:.2f}% with cosine k-NN.\n\n"
        f"Measured on {info['machine']} ({info['cpu']}), torch {info['torch']}, {info['threads']} threads, CPU. "
        f"Reproduce: `python -m demo.evaluate`.\n")
    (args.out / "alpha-sweep.json").write_text(json.dumps({"rows": rows, **info}, indent=1) + "\n")
    (args.out / "alpha-sweep.md").write_text(f"# Discard-ratio sweep (Fig. 7), demo setting\n\n{render_sweep(rows)}\n\n"
                                              "![sweep](alpha-sweep.png)\n")
    plot(rows, _avg(res["rows"]["Individual"]), args.out / "alpha-sweep.png")
    print(render_sweep(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
