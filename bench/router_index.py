"""Router indexes on a distinct bank: exact search (float32, and the router's bfloat16 scan checked in
float32), the IVF index the router uses above ``exact_max``, and a graph index.

    python -m bench.router_index [--switches 1000] [--nprobe 8,16,32] [--ef 64,128,256,512]

The bank's query vectors are made as `bench.scale` makes its distinct banks (switch i holds demo
switch i mod 6's query embeddings moved by a random offset of half their typical norm; the first six
are not moved). For each index it measures the build time, the k-NN time for a batch of 16 held-out
demo images (median of 20 batches), and on how many of the held-out images the routing weights equal
those of a float32 exact search. Where torch sees a GPU, the exact index a GPU server's router holds
(float32 rows scanned on the GPU, switchbank/knn_device.py) is measured too. The graph index is faiss's HNSW (M 32) followed by the same exact re-ranking of 64
candidates that the router's IVF path uses. The product-quantised index is faiss's IVF with 4-bit fast-scan PQ
codes (a sub-quantiser per 4 dimensions: 160 bytes per 1280-d vector, against 1,280 for the router's IVF-SQ8),
whose ``--pq-candidates`` best are re-ranked exactly, a query at a time. Neither is used by the router; they are
measured as the alternatives to its indexes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch  # before faiss, as switchbank.ivf does
import faiss  # noqa: I001
from safetensors.torch import load as st_load

from bench.common import ROOT, md_table, write
from bench.scale import count_owners, query_offset
from switchbank.ivf import ivf_lists

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
            task, q = f"{task}-{i:05d}", (q + query_offset(rng, q.shape[1], norms)).astype(np.float16).astype(np.float32)
        out[task] = q
    return out


def held_out() -> tuple[list[str], torch.Tensor]:
    """The held-out demo images' tasks and their router embeddings (the pretrained demo tower)."""
    from bench.traffic import demo_images
    from switchbank.backbone import DEMO_ARCH, load_backbone

    backbone = load_backbone(DEMO_ARCH, device="cpu")
    images = demo_images()
    with torch.inference_mode():
        emb = torch.cat([backbone.forward(torch.stack([backbone.preprocess(im) for _, im in images[i:i + 64]]))
                         for i in range(0, len(images), 64)])
    return [t for t, _ in images], emb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switches", type=int, default=1000)
    ap.add_argument("--ef", default="64,128,256,512")
    ap.add_argument("--nprobe", default="8,16,32", help="lists the IVF index scans per query (the default is added)")
    ap.add_argument("--pq-nprobe", default="16,32", help="lists the IVF-PQ index scans per query")
    ap.add_argument("--pq-candidates", default="256,1024", help="IVF-PQ candidates re-ranked exactly per query")
    args = ap.parse_args(argv)
    from switchbank.routing import Router

    _, emb = held_out()
    dim = emb.shape[1]
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

    indexes = []

    def record(name: str, build_s: float | None, counts_fn, agreement: float) -> None:
        indexes.append({"index": name, "build_s": build_s, "knn_batch16_ms": timed(counts_fn), "agreement": agreement})
        print(indexes[-1], flush=True)

    def built(**kw):
        router = Router(dim, 10, "cosine", **kw)
        t0 = time.perf_counter()
        router.load(source, counts)
        return router, time.perf_counter() - t0

    plain, build = built(exact_max=1 << 62)
    plain._index.scan = "float32"
    ref = plain.counts(emb)
    record("exact, float32 scan", build, plain.counts, 1.0)
    del plain

    def agreement(got) -> float:
        return float(np.mean([a == b for a, b in zip(got, ref)]))

    served, build = built()
    stats = served.stats()
    record(f"the router's default: {stats['kind']}" + (f", {stats['scan']} scan" if "scan" in stats else ""),
           build, served.counts, agreement(served.counts(emb)))
    if torch.cuda.is_available():  # the index a GPU server's router holds (knn_device)
        on_gpu, build = built(device="cuda")
        record(f"exact on the GPU, {on_gpu.stats()['scan']} scan", build, on_gpu.counts, agreement(on_gpu.counts(emb)))
        del on_gpu
    ivf, build = built(exact_max=20_000)
    default = ivf._index.index.nprobe
    for p in sorted({int(p) for p in args.nprobe.split(",") if p} | {default}):
        ivf._index.index.nprobe = p
        record(f"IVF-SQ8 (exact_max 20,000, {ivf._index.nlist} lists), nprobe {p}"
               + (" (the default)" if p == default else ""), build, ivf.counts, agreement(ivf.counts(emb)))
    del ivf

    owner = [n for n in queries for _ in range(counts[n])]
    x = np.concatenate([served.prepare(queries[n]) for n in queries])
    graph = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 64
    t0 = time.perf_counter()
    graph.add(x)
    build = time.perf_counter() - t0
    rows_t = torch.from_numpy(x)

    def reranked(index, m):
        """Routing counts from ``index``'s ``m`` candidates per query, ranked exactly."""
        def search(batch):
            q = served.prepare(batch)
            _, ids = index.search(q, m)
            tops = []
            for qi, row in zip(torch.from_numpy(q), ids):
                row = np.sort(row[row >= 0])  # by position, so that equal scores keep the earlier example
                scores = rows_t.index_select(0, torch.from_numpy(row)) @ qi
                tops.append(row[np.argsort(-scores.numpy(), kind="stable")[:10]])
            return count_owners(tops, owner)
        return search

    search = reranked(graph, CANDIDATES)
    for ef in [int(e) for e in args.ef.split(",") if e]:
        graph.hnsw.efSearch = ef
        record(f"HNSW, M 32, efSearch {ef}", build, search, agreement(search(emb)))
    graph.reset()  # its memory, before the next index is built

    pq = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(x.shape[1]), x.shape[1], ivf_lists(x.shape[0]), x.shape[1] // 4, 4,
                                  faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    pq.train(x[np.random.default_rng(0).permutation(x.shape[0])[:65_536]])
    pq.add(x)
    build = time.perf_counter() - t0
    for p in [int(v) for v in args.pq_nprobe.split(",") if v]:
        pq.nprobe = p
        for m in [int(v) for v in args.pq_candidates.split(",") if v]:
            search = reranked(pq, m)
            record(f"IVF-PQ fast scan ({pq.nlist} lists, {pq.pq.M}x4 bits), nprobe {p}, {m} candidates re-ranked",
                   build, search, agreement(search(emb)))
    results = {"switches": args.switches, "vectors": int(sum(counts.values())), "held_out_images": len(ref),
               "indexes": indexes}
    rows = [[r["index"], "" if r["build_s"] is None else f"{r['build_s']:.1f}", f"{r['knn_batch16_ms']:.2f}",
             f"{100 * r['agreement']:.2f}%"] for r in indexes]
    md = (f"# Router indexes on a distinct bank of {args.switches:,} switches ({results['vectors']:,} query vectors)\n\n"
          + md_table(["index", "build s", "k-NN, batch of 16 (ms)", f"weights equal to exact ({len(ref)} held-out images)"],
                     rows)
          + "\n\nRerun: `python -m bench.router_index`.")
    print(md)
    write("router-index", results, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
