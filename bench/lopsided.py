"""The IVF router index on a lopsided bank: many switches of a few tasks, one of each of the others.

    python -m bench.lopsided [--copies 500] [--distinct 1000]

A bank a platform grows one customer domain at a time holds hundreds of switches of some tasks and
a single switch of a new one. Its IVF lists are centred on the many; the few lie far from every
centre, and their own queries probe other lists. The bank here: the six demo switches, plus
``--copies`` switches of each of four demo tasks (their query embeddings moved by a random offset,
as bench.scale makes distinct banks), so that two tasks keep one switch each. For the router's IVF
index (exact_max 100,000, so that it is used at this size) with the vectors farthest from every
list centre held apart and scanned exactly (the default), and with none held apart (as before),
it measures the build time (mean of two), the k-NN time for a batch of 16 held-out demo images
(median over 20 batches searched 5 times, the two indexes alternating batch by batch) and on how
many held-out images, overall and per task, the routing weights equal those of a float32 exact
search. ``--distinct N`` repeats the comparison on a distinct bank of N switches (bench.scale's,
IVF from 20,000 vectors) to show what holding vectors apart costs where no domain is rare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from bench.common import md_table, write
from bench.router_index import distinct_queries, held_out
from bench.scale import query_offset


def lopsided_queries(copies: int, rare: tuple[str, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """The six demo switches' queries, plus ``copies`` moved copies of each demo task not in ``rare``."""
    demo = distinct_queries(6)
    norms = np.median([np.linalg.norm(q, axis=1).mean() for q in demo.values()])
    rng = np.random.default_rng(seed)
    out = dict(demo)
    for task in sorted(demo):
        if task in rare:
            continue
        for i in range(copies):
            q = demo[task] + query_offset(rng, demo[task].shape[1], norms)
            out[f"{task}-{i:05d}"] = q.astype(np.float16).astype(np.float32)
    return out


def compare(queries: dict[str, np.ndarray], emb: torch.Tensor, labels: list[str], exact_max: int) -> list[dict]:
    from switchbank import ivf
    from switchbank.routing import Router
    counts = {n: q.shape[0] for n, q in queries.items()}
    dim = next(iter(queries.values())).shape[1]

    def source(order):
        for n in order:
            yield n, queries[n]

    def built(max_vectors: int):
        r = Router(dim, 10, "cosine", exact_max=max_vectors)
        t0 = time.perf_counter()
        r.load(source, counts)
        return r, time.perf_counter() - t0

    exact, _ = built(1 << 62)
    exact._index.scan = "float32"
    ref = exact.counts(emb)
    del exact
    default_far = ivf.IVF.SIDE_FAR
    cases = {"none held apart": float("inf"), "farthest held apart (default)": default_far}
    routers, builds = {}, {label: [] for label in cases}
    # built in the order A B B A, each build timed (the second of two builds in a process ran
    # about 10% slower here); the last of each is kept for the searches
    for label in [*cases, *reversed(cases)]:
        routers.pop(label, None)
        ivf.IVF.SIDE_FAR = cases[label]
        try:
            routers[label], seconds = built(exact_max)
        finally:
            ivf.IVF.SIDE_FAR = default_far
        builds[label].append(seconds)
    batches = [emb[i:i + 16] for i in range(0, 16 * 20, 16)]
    times: dict[str, list[float]] = {label: [] for label in cases}
    for r in routers.values():
        r.counts(batches[0])
    for _ in range(5):
        for batch in batches:
            for label in cases:
                t0 = time.perf_counter()
                routers[label].counts(batch)
                times[label].append(time.perf_counter() - t0)
    lab = np.array(labels)
    out = []
    for label in cases:
        r = routers[label]
        eq = np.array([a == b for a, b in zip(r.counts(emb), ref)])
        stats = r.stats()
        out.append({"index": label, "kind": stats["kind"], "held_apart": stats.get("held_apart", 0),
                    "vectors": stats["distinct_vectors"], "build_s": statistics.mean(builds[label]),
                    "builds_s": builds[label], "knn_batch16_ms": 1000 * statistics.median(times[label]),
                    "agreement": float(eq.mean()),
                    "agreement_by_task": {t: float(eq[lab == t].mean()) for t in sorted(set(labels))}})
        print(out[-1], flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=500, help="switches of each of the four common tasks")
    ap.add_argument("--rare", default="stamps,textures", help="demo tasks the bank holds one switch of")
    ap.add_argument("--distinct", type=int, default=1000, help="switches of the distinct bank compared too (0: none)")
    args = ap.parse_args(argv)
    labels, emb = held_out()
    rare = tuple(t for t in args.rare.split(",") if t)
    banks = {f"lopsided: {6 + 4 * args.copies:,} switches, one each of {', '.join(rare)}":
             (lopsided_queries(args.copies, rare), 100_000)}
    if args.distinct:
        banks[f"distinct: {args.distinct:,} switches"] = (distinct_queries(args.distinct), 20_000)
    results = {"held_out_images": len(labels), "banks": []}
    rows = []
    for name, (queries, exact_max) in banks.items():
        found = compare(queries, emb, labels, exact_max)
        results["banks"].append({"bank": name, "exact_max": exact_max, "indexes": found})
        for r in found:
            worst = min(r["agreement_by_task"].items(), key=lambda kv: kv[1])
            rows.append([name, r["index"], f"{r['vectors']:,}", f"{r['held_apart']:,}", f"{r['build_s']:.1f}",
                         f"{r['knn_batch16_ms']:.2f}", f"{100 * r['agreement']:.2f}%",
                         f"{worst[0]}: {100 * worst[1]:.1f}%"])
        del queries
    md = ("# The IVF router index on a lopsided bank\n\n"
          + md_table(["bank", "IVF index", "vectors", "held apart", "build s", "k-NN, batch of 16 (ms)",
                      f"weights equal to exact ({len(labels)} held-out images)", "least agreeing task"], rows)
          + "\n\nRerun: `python -m bench.lopsided`.")
    print(md)
    write("router-lopsided", results, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
