"""Prometheus metrics, prefix switchbank_, in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _EngineCollector:
    """Reads cache, queue and bank figures at scrape time rather than mirroring them."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        engine = getattr(self.state, "engine", None)
        batcher = getattr(self.state, "batcher", None)
        if engine is None:
            return
        s = engine.cache.stats()
        for name, value, doc in (
            ("cache_hits", s.hits, "delta cache hits"),
            ("cache_misses", s.misses, "delta cache misses (materialisations)"),
            ("cache_evictions", s.evictions, "combinations evicted to stay within the byte budget"),
            ("cache_invalidations", s.invalidations, "combinations dropped because a switch changed"),
            ("cache_bypasses", s.bypasses, "combinations served without caching"),
        ):
            c = CounterMetricFamily(f"switchbank_{name}", doc)
            c.add_metric([], value)
            yield c
        e = engine.stats()
        for name, value, doc in (
            ("batches_cached", e.batches_cached, "batches of one combination run on its cached weights"),
            ("batches_mixed", e.batches_mixed, "batches run as one mixed forward"),
            ("batches_grouped", e.batches_grouped,
             "batches run as one forward per combination (towers the mixed forward does not support)"),
            ("groups_hot", e.groups_hot, "combinations in a batch served from cached weights"),
            ("groups_cold", e.groups_cold, "combinations in a batch served with weights merged just in time"),
        ):
            c = CounterMetricFamily(f"switchbank_{name}", doc)
            c.add_metric([], value)
            yield c
        r, rt, h = engine.resident.stats(), engine.router.stats(), engine.heads.stats()
        for name, value, doc in (
            ("switch_loads", r.loads, "switch bit planes read from their files"),
            ("switch_evictions", r.evictions, "switch bit planes unloaded to stay within the resident budget"),
            ("head_loads", h.loads, "classification heads read from their switches' files"),
            ("head_evictions", h.evictions, "classification heads dropped to stay within their budget"),
            ("router_rebuilds", rt["rebuilds"], "Auto-Switch index rebuilds (grown, shrunk, past the exact limit, drifted)"),
        ):
            c = CounterMetricFamily(f"switchbank_{name}", doc)
            c.add_metric([], value)
            yield c
        for name, value, doc in (
            ("resident_switches", r.resident, "switches whose bits are in memory"),
            ("resident_bytes", r.resident_bytes, "bytes of switch bits in memory"),
            ("resident_budget_bytes", r.budget_bytes, "budget for switch bits"),
            ("pinned_switches", r.pinned, "switches pinned in memory"),
            ("resident_heads", h.heads, "classification heads read from their files and held in memory"),
            ("head_bytes", h.head_bytes, "bytes of those heads"),
            ("head_budget_bytes", h.budget_bytes, "budget for those heads"),
            ("router_examples", rt["examples"], "query examples in the Auto-Switch index"),
            ("router_vectors", rt["distinct_vectors"], "distinct query vectors in the Auto-Switch index"),
            ("router_bytes", rt["bytes"], "memory of the Auto-Switch index"),
            ("router_approximate", int(rt["kind"] == "approximate"), "1 if the Auto-Switch index is approximate"),
            ("router_rebuilding", int(rt["rebuilding"]), "1 while a new Auto-Switch index is built in the background "
             "(after start-up, or when the index has drifted); the current one answers meanwhile"),
            ("router_drift", rt.get("drift", 0.0), "how far vectors added since the IVF index was built lie from "
             "its list centres, against the vectors it was built with (a rebuild starts past 1.5; 0 when exact)"),
            ("mixed_forward", int(e.mixed_forward), "1 if the tower runs mixed batches in one forward, else 0"),
            ("cache_bytes", s.bytes, "bytes held by cached combinations"),
            ("cache_capacity_bytes", s.capacity_bytes, "delta cache budget"),
            ("cache_entries", s.entries, "cached combinations"),
            ("queue_depth", batcher.depth() if batcher else 0, "requests waiting for a batch"),
            ("switches", len(engine.switches), "switches being served"),
            ("bank_generation", engine.generation, "generation of the bank being served"),
        ):
            g = GaugeMetricFamily(f"switchbank_{name}", doc)
            g.add_metric([], value)
            yield g


class Metrics:
    def __init__(self, state):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("switchbank_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("switchbank_request_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("switchbank_batch_size", "requests per engine batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.materialise = Histogram("switchbank_materialise_seconds", "time to materialise a combination",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.switch_load = Histogram("switchbank_switch_load_seconds", "time to read and decode a switch's bits",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.predictions = Counter("switchbank_predictions", "images classified", ["mode"], registry=r)
        r.register(_EngineCollector(state))
