"""Throughput and latency of the forward paths, side by side in one run.

    python -m bench.forward [--workloads A,B] [--batches 1,8,32] [--repeats 7] [--mixed-rounds 8]

For each batch size: the plain open_clip image-tower forward with no switchbank code (the
reference); the same with its input in channels_last layout, as the engine feeds it on CPU (a
second reference); the pretrained weights through the engine's own tower and kernels, as its
router pass runs them (a third reference: on CPU the engine runs linear layers on oneDNN's matmul,
which is faster than the plain forward's, so this one shows what the rest of switchbank costs);
T-Switch with a warm cache;
Auto-Switch with a warm cache (router pass + merged pass); and the released code's approach, which
rebuilds every parameter (theta0 + sum_t w_t tau_hat_t, dense) for each batch before the forward.

The paths are timed in rounds, each round running every path once (a sample is as many calls as
last about MIN_SAMPLE_S), and each ratio is the median over rounds of the ratio within a round.

Then mixed traffic, in batches of 16, as users send it (bench/traffic.py): for B, every held-out
image of the six demo tasks, shuffled, with no task named (Auto-Switch); for A, explicit weights
following the mixes the demo router gives those images. Every engine configuration (MIX_CASES)
serves the same stream, continued from round to round (a warm-up first; every other round runs the
cases in reverse order), next to the plain forward and the pretrained weights on the engine's
kernels on the same batches; the table reports groups per batch, the share of groups served on
cached weights, the cache hit rate and what the cache holds at the end. The default 2 GiB cache is
used. For B, whose every mix fits in it, one more engine has served the whole stream once before
the measurement (PREWARMED): no mix is new to it, the best case, shown beside the others.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.common import group_counts, interleaved, md_table, paired, summary, sync, timeit, write
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


# the pretrained weights through the engine's own tower and kernels (what the router pass runs):
# the reference that separates what mixing costs from what the engine's kernels gain
ENGINE_BASE = "base weights on the engine's kernels"


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
            ENGINE_BASE: lambda: eng.embed(x),
            "T-Switch (warm)": lambda: eng.run(x, [Route(task=first)] * bs),
            "Auto-Switch (warm)": lambda: eng.run(x, [Route()] * bs),
            "released: rebuild per batch": lambda: released(x),
        }
        # enough calls per sample that a sample lasts about MIN_SAMPLE_S (batch 1 is short)
        t = statistics.median(timeit(plain, 3, warmup=2))
        inner = max(1, round(MIN_SAMPLE_S / max(t, 1e-6)))
        times = interleaved(paths, repeats, inner, warmup=2)
        ref, ref_cl, ref_eng = times["plain forward"], times["plain forward, channels_last"], times[ENGINE_BASE]
        for name, samples in times.items():
            t = summary(samples)
            ratio = paired(ref, samples)  # throughput ratio = plain time / path time, per round
            ratio_cl = paired(ref_cl, samples)
            ratio_eng = paired(ref_eng, samples)
            rows.append([bs, name, bs / t["median"], t["median"] * 1000, (t["p75"] - t["p25"]) * 1000, ratio,
                         ratio_cl, ratio_eng])
            results.append({"batch": bs, "path": name, "images_per_s": bs / t["median"], "seconds_per_call": t,
                            "calls_per_sample": inner, "throughput_vs_plain": ratio,
                            "throughput_vs_plain_channels_last": ratio_cl, "throughput_vs_engine_base": ratio_eng})
    return rows, results


# --- mixed traffic ----------------------------------------------------------------------------
DEFAULT_CACHE = 2 << 30  # the server's default SWITCHBANK_CACHE_BYTES
MIX_CASES = {
    "before: one forward per combination, every combination cached": {"mixed_forward": False, "hot_after": 1,
                                                                      "hot_mix_after": 1},
    "one pass, cached on first use": {"hot_after": 1, "hot_mix_after": 1},
    "one pass, cached once seen in 2 batches": {"hot_after": 2, "hot_mix_after": 2},
    "one pass, one switch cached once seen in 2 batches, a mix in 4": {"hot_after": 2, "hot_mix_after": 4},
    "one pass, one switch cached once seen in 2 batches, a mix in 8 (default)": {"hot_after": 2, "hot_mix_after": 8},
    "one pass, one switch cached once seen in 2 batches, a mix never": {"hot_after": 2, "hot_mix_after": 0},
    "one pass, never cached": {"hot_after": 0, "hot_mix_after": 0},
}
# where the default cache holds every mix of the stream (the demo tower's, not ViT-B-32's): the
# stream served once before the measurement, so that no mix is new; a best case, beside the others
PREWARMED = "one pass, every mix of the stream cached beforehand (best case)"


def mixed_requests(key: str, w, mixes: list[dict[str, float]]) -> list[tuple[torch.Tensor, Route]]:
    """B: every shuffled demo image, Auto-Switch. A: weights following the demo's mixes (demo task
    names mapped onto A's switches), each with an image of its top-weighted switch's distribution."""
    if key == "B":
        from bench.traffic import demo_images
        return [(w.backbone.preprocess(im), Route()) for _, im in demo_images()]
    demo_names = sorted({n for m in mixes for n in m})
    names = dict(zip(demo_names, sorted(w.switches)))
    out = []
    for i, m in enumerate(mixes):
        mapped = {names[n]: v for n, v in m.items()}
        top = max(sorted(mapped), key=lambda n: mapped[n])
        pool = w.images[top]
        out.append((pool[i % len(pool)], Route(weights=mapped)))
    return out


def bench_mixed(key: str, w, requests, batch: int, warmup: int, rounds: int, per_round: int):
    """Each case on the same stream of batches, in interleaved rounds of ``per_round`` batches."""
    from bench.traffic import stream
    engines = {label: w.engine(cache_bytes=DEFAULT_CACHE, **opts) for label, opts in MIX_CASES.items()}
    if key == "B":
        eng = engines[PREWARMED] = w.engine(cache_bytes=DEFAULT_CACHE, hot_after=1, hot_mix_after=1)
        for chunk in stream(requests, batch, 0, -(-len(requests) // batch)):
            eng.run(torch.stack([r[0] for r in chunk]), [r[1] for r in chunk])
        if eng.cache.stats().evictions:
            del engines[PREWARMED]  # the cache does not hold the stream's mixes: no best case to show
    model, dev, dt = w.backbone.model, w.backbone.device, w.backbone.dtype
    layout = torch.channels_last if w.backbone.channels_last else torch.contiguous_format

    def batches(start: int, count: int):
        out = []
        for chunk in stream(requests, batch, start, count):
            x = torch.stack([r[0] for r in chunk])
            out.append((x, x.to(dev, dt).contiguous(memory_format=layout), [r[1] for r in chunk]))
        return out

    def plain(bs):
        with torch.inference_mode():
            for _, xd, _ in bs:
                model(xd)

    def case(eng):
        return lambda bs: [eng.run(x, routes) for x, _, routes in bs]

    default = next(e for label, e in engines.items() if "(default)" in label)

    def engine_base(bs):
        for x, _, _ in bs:
            default.embed(x)

    runs = {"plain forward": plain, ENGINE_BASE: engine_base, **{label: case(e) for label, e in engines.items()}}
    for fn in runs.values():
        fn(batches(0, warmup))
    before = {label: (e.stats(), e.cache.stats()) for label, e in engines.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        bs = batches((warmup + r * per_round) * batch, per_round)
        # every other round in reverse, so that no case always runs right after the same one (with
        # 5 rounds in one order, the default's median ratio on the demo tower came out 0.37x where
        # its images a second gave 0.43x)
        order = list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]
        for label, fn in order:
            sync()
            t0 = time.perf_counter()
            fn(bs)
            sync()
            times[label].append(time.perf_counter() - t0)
    rows, results = [], []
    ref = times["plain forward"]
    for label, samples in times.items():
        t = summary(samples)
        images = batch * per_round
        item = {"case": label, "images_per_s": images / t["median"], "seconds_per_round": t,
                "throughput_vs_plain": paired(ref, samples)}
        item["throughput_vs_engine_base"] = paired(times[ENGINE_BASE], samples)
        row = [label, images / t["median"], item["throughput_vs_plain"], item["throughput_vs_engine_base"]]
        if label in engines:
            e = engines[label]
            (s0, c0), s1, c1 = before[label], e.stats(), e.cache.stats()
            hot, cold, nb = group_counts(vars(s0), vars(s1))
            groups = hot + cold
            leases = (c1.hits - c0.hits) + (c1.misses - c0.misses)
            item.update({
                "groups_per_batch": groups / max(1, nb),
                "groups_on_cached_weights": hot / max(1, groups),
                "cache_hit_rate": (c1.hits - c0.hits) / max(1, leases),
                "cache_bytes": c1.bytes, "cache_entries": c1.entries, "cache_capacity": c1.capacity_bytes,
                "materialised": c1.misses - c0.misses, "evictions": c1.evictions - c0.evictions,
            })
            row += [item["groups_per_batch"], item["groups_on_cached_weights"], item["cache_hit_rate"],
                    f"{c1.bytes / 2**20:.0f} MiB / {c1.entries}", item["materialised"]]
        else:
            row += ["", "", "", "", ""]
        rows.append(row)
        results.append(item)
    return rows, results


MIX_HEADERS = ["path", "images/s", "throughput vs plain", "vs base weights on the engine's kernels", "groups per batch", "groups on cached weights",
               "cache hit rate", "cache bytes / entries", "towers built"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="A,B")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mixed-rounds", type=int, default=8, help="rounds of mixed traffic")
    ap.add_argument("--only", choices=("single", "mixed"), help="run one part only (default: both)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    single, mixed_part, md, mixed_md = {}, {}, [], []
    mixes = None
    for key in args.workloads.split(","):
        w = WORKLOADS[key]()
        if args.only != "mixed":
            rows, results = bench_workload(w, batches, args.repeats)
            single[key] = {"workload": w.name, "results": results}
            table = md_table(["batch", "path", "images/s", "median ms", "IQR ms", "throughput vs plain",
                              "vs plain, channels_last", "vs base weights on the engine's kernels"], rows)
            md.append(f"## Workload {w.name}\n\n{table}\n")
            print(f"\nWorkload {w.name}\n{table}", flush=True)
        if args.only == "single":
            continue
        if mixes is None:
            from bench.traffic import demo_mixes, mix_summary
            demo = w if key == "B" else WORKLOADS["B"]()
            mixes = demo_mixes(demo.engine())
            ms = mix_summary(mixes)
            mixed_part["demo_mixes"] = ms
            summary = (f"Demo traffic: {ms['requests']} held-out images, {ms['single_switch']:.1%} routed to one "
                       f"switch, {ms['distinct']} distinct mixes ({ms['seen_once']} seen once), "
                       f"{ms['groups_per_batch']:.1f} distinct mixes per batch of {ms['batch']}.")
            mixed_md.append(summary + "\n")
            print(summary)
        per_round, warm = (10, 10) if key == "B" else (6, 4)
        rows, results = bench_mixed(key, w, mixed_requests(key, w, mixes), 16, warm, args.mixed_rounds, per_round)
        mixed_part[key] = {"workload": w.name, "batch": 16, "warmup_batches": warm, "rounds": args.mixed_rounds,
                           "batches_per_round": per_round, "results": results}
        what = "Auto-Switch on shuffled held-out demo images" if key == "B" else "explicit weights following the demo mixes"
        table = md_table(MIX_HEADERS, rows)
        mixed_md.append(f"## Workload {w.name}: {what}, batches of 16\n\n{table}\n")
        print(f"\nMixed traffic ({what})\n{table}", flush=True)
    if single:
        write("perf-forward", single, "# Forward paths, single-task batches\n\n" + "\n".join(md) +
              "\nRerun: `python -m bench.forward --only single`.")
    if mixed_part:
        write("perf-mixed", mixed_part, "# Mixed traffic\n\n" + "\n".join(mixed_md) +
              "\nEach configuration serves the same stream of batches, continued from round to round after a "
              "warm-up, next to the plain forward on the same batches, every other round in reverse order (the cache "
              "is the server's default, 2 GiB). "
              "Rerun: `python -m bench.forward --only mixed`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
