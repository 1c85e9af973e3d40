"""Router indexes on a distinct bank: the router's own (exact or IVF) against a graph index.

    python -m bench.router_index [--switches 1000] [--ef 64,128,256,512]

The bank's query vectors are made as `bench.scale` makes its distinct banks (switch i holds demo
switch i mod 6's query embeddings moved by a random offset of half their typical norm; the first six
are not moved). For each index it measures the build time, the k-NN time for a batch of 16 held-out
demo images (median of 20 batches), and on how many of the held-out images the routing weights equal
exact search's. The graph index is faiss's HNSW (M 32) followed by the same exact re-ranking of 64
candidates that the router's IVF path uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch  # before faiss, as switchbank.knn does
import faiss  # noqa: I001
from safetensors.torch import load as st_load

from bench.common import ROOT, md_table, write

DEMO = ROOT / "demo" / "bank"
CANDIDATES = 64


def distinct_queries(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    manifest = json.loads((DEMO / "manifest.json").read_text())
    demo = {name: st_load((DEMO / "switches" / info["file"]).read_bytes())["queries"].float().numpy()
            for name, info in sorted(manifest["switches"].items())}
    names = list(demo)
    norms = np.median([np.linalg.norm(q, axis=1).mean() for q in demo.values()])
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        task, q = names[i % len(names)], demo[names[i % len(names)]]
        if i >= len(names):
            offset = rng.normal(size=q.shape[1]).astype(np.float32)
            offset *= 0.5 * norms / np.linalg.norm(offset)
            task, q = f"{task}-{i:05d}", (q + offset).astype(np.float16).astype(np.float32)
        out[task] = q
    return out


def _counts(rows, owner) -> list[dict[str, int]]:
    out = []
    for row in rows:
        c: dict[str, int] = {}
        for i in row:
            c[owner[i]] = c.get(owner[i], 0) + 1
        out.append(c)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switches", type=int, default=1000)
    ap.add_argument("--ef", default="64,128,256,512")
    args = ap.parse_args(argv)
    from bench.traffic import demo_images
    from switchbank.backbone import DEMO_ARCH, load_backbone
    from switchbank.routing import Router

    backbone = load_backbone(DEMO_ARCH, device="cpu")
    images = demo_images()
    with torch.inference_mode():
        emb = torch.cat([backbone.forward(torch.stack([backbone.preprocess(im) for _, im in images[i:i + 64]]))
                         for i in range(0, len(images), 64)])
    queries = distinct_queries(args.switches)
    counts = {n: q.shape[0] for n, q in queries.items()}

    def source(order):
        for n in order:
            yield n, queries[n]

    def timed(fn):
        fn(emb[:16])
        ts = []
        for r in range(20):
            batch = emb[16 * r:16 * r + 16]
            t0 = time.perf_counter()
            fn(batch)
            ts.append(time.perf_counter() - t0)
        return 1000 * statistics.median(ts)

    served = Router(backbone.embed_dim, 10, "cosine")
    t0 = time.perf_counter()
    served.load(source, counts)
    build = time.perf_counter() - t0
    exact = Router(backbone.embed_dim, 10, "cosine", exact_max=1 << 62)
    exact.load(source, counts)
    ref = exact.counts(emb)
    rows = [["exact (flat)", "", f"{timed(exact.counts):.2f}", "100.00%"]]
    results = {"switches": args.switches, "vectors": int(sum(counts.values())), "held_out_images": len(ref),
               "indexes": [{"index": "exact", "knn_batch16_ms": float(rows[0][2]), "agreement": 1.0}]}
    del exact
    agree = float(np.mean([a == b for a, b in zip(served.counts(emb), ref)]))
    kind = served.stats()["kind"]
    rows.append([f"the router's ({kind})", f"{build:.1f}", f"{timed(served.counts):.2f}", f"{100 * agree:.2f}%"])
    results["indexes"].append({"index": f"router ({kind})", "build_s": build, "knn_batch16_ms": float(rows[-1][2]),
                               "agreement": agree})
    print(rows[-1], flush=True)

    owner = [n for n in queries for _ in range(counts[n])]
    x = np.concatenate([served.prepare(queries[n]) for n in queries])
    graph = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 64
    t0 = time.perf_counter()
    graph.add(x)
    build = time.perf_counter() - t0

    def search(batch):
        q = served.prepare(batch)
        _, ids = graph.search(q, CANDIDATES)
        tops = []
        for qi, row in zip(q, ids):
            row = np.sort(row[row >= 0])  # by position, so that equal scores keep the earlier example
            scores = x[row] @ qi
            tops.append(row[np.argsort(-scores, kind="stable")[:10]])
        return _counts(tops, owner)

    for ef in [int(e) for e in args.ef.split(",") if e]:
        graph.hnsw.efSearch = ef
        agree = float(np.mean([a == b for a, b in zip(search(emb), ref)]))
        rows.append([f"HNSW, M 32, efSearch {ef}", f"{build:.1f}", f"{timed(search):.2f}", f"{100 * agree:.2f}%"])
        results["indexes"].append({"index": f"hnsw ef {ef}", "build_s": build, "knn_batch16_ms": float(rows[-1][2]),
                                   "agreement": agree})
        print(rows[-1], flush=True)
    md = (f"# Router indexes on a distinct bank of {args.switches:,} switches ({results['vectors']:,} query vectors)\n\n"
          + md_table(["index", "build s", "k-NN, batch of 16 (ms)", f"weights equal to exact ({len(ref)} held-out images)"],
                     rows)
          + "\n\nRerun: `python -m bench.router_index`.")
    print(md)
    write("router-index", results, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
