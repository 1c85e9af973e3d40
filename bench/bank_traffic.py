"""Auto-Switch traffic on big banks: what a batch of real requests costs as the bank grows.

    python -m bench.bank_traffic [--switches 1000] [--rounds 3] [--batches 12]

Results go to bench/results/bank-traffic-<switches>-<machine>.{json,md}.

Every held-out image of the six demo tasks, shuffled, in batches of 16 with no task named, served
by engines on three banks: the six-switch demo bank, ``--switches`` renamed copies of it, and
``--switches`` distinct switches (made as `bench.scale` makes them: each moved copy owns query
vectors of its own, so a request's ten nearest examples belong to up to ten different switches).
Each engine first serves the whole stream once, as a server that has been running a while would
have; then, batch by batch, the plain forward and every engine run the same batch in turn, and
each ratio is the median over batches of the ratio within a batch. The table reports how many
switches a request mixes, the distinct mixes (groups) per batch, the share of groups on cached
weights, the cold switch loads during the measurement, and the router's k-NN for the batch (timed
after each engine's batch, on the batch's embeddings) against the plain forward and against the
engine's whole batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ROOT, group_counts, md_table, summary, write
from bench.scale import synth_bank


def engine_for(backbone, bank: Path):
    from switchbank.bank import Bank
    from switchbank.engine import Engine
    eng = Engine(backbone, k=10, router_metric="cosine")
    eng.sync(Bank(bank))
    eng.router.join()  # the index the bank ends with, built after the sync
    return eng


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switches", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the measured batches")
    ap.add_argument("--batches", type=int, default=12, help="batches of 16 measured per round")
    args = ap.parse_args(argv)
    from bench.traffic import demo_images
    from switchbank.backbone import DEMO_ARCH, load_backbone
    from switchbank.engine import Route

    backbone = load_backbone(DEMO_ARCH, device="cpu")
    images = demo_images()
    batch = 16
    xs = [torch.stack([backbone.preprocess(im) for _, im in images[i:i + batch]])
          for i in range(0, len(images) - batch + 1, batch)]
    auto = [Route()] * batch
    n = args.switches
    with tempfile.TemporaryDirectory() as tmp:
        banks = {"demo bank (6 switches)": ROOT / "demo" / "bank",
                 f"{n:,} copies": synth_bank(n, Path(tmp) / "copies", distinct=False),
                 f"{n:,} distinct": synth_bank(n, Path(tmp) / "distinct", distinct=True)}
        engines = {label: engine_for(backbone, path) for label, path in banks.items()}
        for eng in engines.values():  # a server that has served this traffic before
            for x in xs:
                eng.run(x, auto)
        model = backbone.model
        layout = torch.channels_last if backbone.channels_last else torch.contiguous_format
        before = {label: (e.stats(), e.resident.stats()) for label, e in engines.items()}
        times: dict[str, list[float]] = {"plain forward": [], **{label: [] for label in engines}}
        knn: dict[str, list[float]] = {label: [] for label in engines}
        emb = [engines[next(iter(engines))].embed(x) for x in xs[:args.batches]]  # the router's input
        for r in range(args.rounds):
            for x, e_x in zip(xs[:args.batches], emb):
                xd = x.contiguous(memory_format=layout)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model(xd)
                times["plain forward"].append(time.perf_counter() - t0)
                for label, eng in engines.items():
                    t0 = time.perf_counter()
                    eng.run(x, auto)
                    times[label].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    eng.router.weights(e_x)
                    knn[label].append(time.perf_counter() - t0)
        mixes = {label: [len(w) for e_x in emb for w in e.router.weights(e_x)] for label, e in engines.items()}
    ref = times["plain forward"]
    rows, results = [], []
    for label, samples in times.items():
        item = {"case": label, "ms_per_batch": summary([1000 * s for s in samples]),
                "throughput_vs_plain": statistics.median(a / b for a, b in zip(ref, samples))}
        row = [label, f"{item['ms_per_batch']['median']:.1f}", f"{item['throughput_vs_plain']:.3f}x"]
        if label in engines:
            e = engines[label]
            (s0, r0), s1, c1, r1 = before[label], e.stats(), e.cache.stats(), e.resident.stats()
            hot, cold, nb = group_counts(vars(s0), vars(s1))
            groups = hot + cold
            item.update({"knn_ms": summary([1000 * s for s in knn[label]]),
                         "knn_vs_plain_forward": statistics.median(k / p for k, p in zip(knn[label], ref)),
                         "knn_vs_batch": statistics.median(k / b for k, b in zip(knn[label], samples)),
                         "switches_per_request": statistics.mean(mixes[label]),
                         "groups_per_batch": groups / max(1, nb),
                         "groups_on_cached_weights": hot / max(1, groups),
                         "cold_loads": r1.loads - r0.loads, "resident_switches": r1.resident,
                         "cache_bytes": c1.bytes, "cache_entries": c1.entries})
            row += [f"{item['switches_per_request']:.1f}", f"{item['groups_per_batch']:.1f}",
                    f"{100 * item['groups_on_cached_weights']:.0f}%", item["cold_loads"],
                    f"{item['knn_ms']['median']:.1f} ms ({100 * item['knn_vs_plain_forward']:.0f}% / "
                    f"{100 * item['knn_vs_batch']:.0f}%)"]
        else:
            row += ["", "", "", "", ""]
        rows.append(row)
        results.append(item)
    md = (f"# Auto-Switch traffic on big banks (batches of 16 shuffled held-out images, {len(ref)} batches)\n\n"
          + md_table(["bank", "ms a batch (median)", "throughput vs plain", "switches a request mixes",
                      "groups a batch", "groups on cached weights", "cold loads",
                      "k-NN a batch (of the plain forward / of the engine's batch)"], rows)
          + f"\n\nRerun: `python -m bench.bank_traffic --switches {n}`.")
    print(md)
    write(f"bank-traffic-{n}", {"switches": n, "batch": batch, "batches": len(ref), "cases": results}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
