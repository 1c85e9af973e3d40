"""Throughput and latency of the forward paths, side by side in one run.

    python -m bench.forward [--workloads A,B] [--batches 1,8,32] [--repeats 7]

For each batch size: the plain open_clip image-tower forward with no switchbank code (the
reference); the same with its input in channels_last layout, as the engine feeds it on CPU (a
second reference, which shows what switchbank itself adds); T-Switch with a warm cache;
Auto-Switch with a warm cache (router pass + merged pass); and the released code's approach, which
rebuilds every parameter (theta0 + sum_t w_t tau_hat_t, dense) for each batch before the forward.

The paths are timed in rounds, each round running every path once (a sample is as many calls as
last about MIN_SAMPLE_S), and each ratio is the median over rounds of the ratio within a round.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from bench.common import interleaved, md_table, paired, summary, timeit, write
from bench.workloads import WORKLOADS
from switchbank.combine import dense_task_vector
from switchbank.engine import Route

MIN_SAMPLE_S = 0.25


def released_approach(w, eng):
    """Per batch: route (batch-averaged weights), rebuild every parameter densely, copy it in, forward."""
    model, b = w.backbone.model, w.backbone
    names = list(w.switches)
    dense = {n: dense_task_vector(w.switches[n], b.params) for n in names}
    params = dict(model.named_parameters())
    base = {k: v.detach().clone() for k, v in params.items()}

    def run(x):
        emb = b.forward(x)
        weights = eng.router.weights(emb.cpu())
        mean = {n: sum(float(r.get(n, 0)) for r in weights) / len(weights) for n in names}
        with torch.no_grad():
            for k, p in params.items():
                tv = torch.zeros_like(p)
                for n in names:
                    if mean[n]:
                        tv += dense[n][k] * mean[n]
                p.copy_(base[k] + tv)
            out = model(x.to(b.device, b.dtype))
            for k, p in params.items():  # restore, so the other paths see the base weights
                p.copy_(base[k])
        return out
    return run


def bench_workload(w, batches, repeats):
    eng = w.engine()
    first = next(iter(w.switches))
    model, dev, dt = w.backbone.model, w.backbone.device, w.backbone.dtype
    released = released_approach(w, eng)
    rows, results = [], []
    for bs in batches:
        x = w.images[first][:bs]
        if x.shape[0] < bs:
            x = x.repeat((bs + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:bs]
        xd = x.to(dev, dt)
        xcl = xd.contiguous(memory_format=torch.channels_last)

        def plain():
            with torch.inference_mode():
                model(xd)

        def plain_cl():
            with torch.inference_mode():
                model(xcl)

        paths = {
            "plain forward": plain,
            "plain forward, channels_last": plain_cl,
            "T-Switch (warm)": lambda: eng.run(x, [Route(task=first)] * bs),
            "Auto-Switch (warm)": lambda: eng.run(x, [Route()] * bs),
            "released: rebuild per batch": lambda: released(x),
        }
        # enough calls per sample that a sample lasts about MIN_SAMPLE_S (batch 1 is short)
        t = statistics.median(timeit(plain, 3, warmup=2))
        inner = max(1, round(MIN_SAMPLE_S / max(t, 1e-6)))
        times = interleaved(paths, repeats, inner, warmup=2)
        ref, ref_cl = times["plain forward"], times["plain forward, channels_last"]
        for name, samples in times.items():
            t = summary(samples)
            ratio = paired(ref, samples)  # throughput ratio = plain time / path time, per round
            ratio_cl = paired(ref_cl, samples)
            rows.append([bs, name, bs / t["median"], t["median"] * 1000, (t["p75"] - t["p25"]) * 1000, ratio,
                         ratio_cl])
            results.append({"batch": bs, "path": name, "images_per_s": bs / t["median"], "seconds_per_call": t,
                            "calls_per_sample": inner, "throughput_vs_plain": ratio,
                            "throughput_vs_plain_channels_last": ratio_cl})
    return rows, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="A,B")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    payload, md = {}, []
    for key in args.workloads.split(","):
        w = WORKLOADS[key]()
        rows, results = bench_workload(w, batches, args.repeats)
        payload[key] = {"workload": w.name, "results": results}
        table = md_table(["batch", "path", "images/s", "median ms", "IQR ms", "throughput vs plain",
                          "vs plain, channels_last"], rows)
        md.append(f"## Workload {w.name}\n\n{table}\n")
        print(f"\nWorkload {w.name}\n{table}", flush=True)
    write("perf-forward", payload, "# Forward paths\n\n" + "\n".join(md) + "\nRerun: `python -m bench.forward`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
