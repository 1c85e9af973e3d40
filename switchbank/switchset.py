"""The set of switches an engine serves: checking a switch against the backbone, adding and
removing switches, following a bank directory (switches read without their bits, see format.py),
and the router's source of query embeddings. Engine (engine.py) builds on it."""

from __future__ import annotations

import gc
import logging
import threading
from contextlib import contextmanager

from .bank import Bank
from .errors import Incompatible, NotFound
from .format import Recent, read_queries
from .types import Switch

log = logging.getLogger("switchbank.engine")


class SwitchSet:
    """Needs, from the engine: backbone, router, router_ready_exact, resident, heads, cache and hot."""

    def __init__(self):
        self._switches: dict[str, Switch] = {}
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # the bank watcher and admin calls may sync at once
        self.generation = -1
        self.bank: Bank | None = None  # the bank last synced with, followed again when a file changes
        self._fitted: set[tuple] = set()  # tensor layouts (name, shape pairs) known to fit the backbone

    @property
    def switches(self) -> dict[str, Switch]:
        with self._lock:
            return dict(self._switches)

    def check_layout(self, layout) -> None:
        """Raise unless a switch file's declared layout fits this backbone (before it is decoded)."""
        meta = layout.meta
        self._fits(meta["name"], meta["backbone_fingerprint"], layout.shapes(),
                   [k[len("dense."):] for k in layout.table if k.startswith("dense.")],
                   layout.dim("head.weight", 1), layout.dim("queries", 1), meta.get("router_fingerprint"))

    def validate(self, sw: Switch) -> None:
        """Raise unless ``sw`` can run on this backbone (fingerprint, shapes, head, queries)."""
        self._fits(sw.name, sw.backbone_fingerprint, sw.shapes(), list(sw.dense),
                   None if sw.head is None else sw.head.dim,
                   None if sw.queries is None else sw.queries.shape[1], sw.router_fingerprint)

    def _fits(self, name, fingerprint, shapes, dense, head_dim, query_dim, router_fingerprint) -> None:
        b = self.backbone
        if fingerprint != b.fingerprint:
            raise Incompatible(f"switch {name!r} was built for backbone {fingerprint[:19]}..., "
                               f"this server runs {b.fingerprint[:19]}... ({b.arch})")
        layout = tuple(shapes.items())
        # fine-tunes of one backbone share their layout: a bank of thousands checks it once
        if layout not in self._fitted:
            for tensor, shape in shapes.items():
                t = b.params.get(tensor)
                if t is None:
                    raise Incompatible(f"switch {name!r} has tensor {tensor!r}, which the backbone lacks")
                if tuple(t.shape) != tuple(shape):
                    raise Incompatible(f"switch {name!r} tensor {tensor!r} has shape {tuple(shape)}, "
                                       f"backbone {tuple(t.shape)}")
            if len(self._fitted) >= 16:  # uploads of ever new layouts keep it bounded
                self._fitted.clear()
            self._fitted.add(layout)
        for tensor in dense:
            if tensor not in b.params or b.params[tensor].dim() != 0:
                raise Incompatible(f"switch {name!r} has 0-dim tensor {tensor!r}, which the backbone lacks")
        if head_dim is None:
            raise Incompatible(f"switch {name!r} has no classification head; build it with --head")
        if head_dim != b.embed_dim:
            raise Incompatible(f"switch {name!r} head expects {head_dim}-d embeddings, backbone gives {b.embed_dim}")
        if query_dim is not None:
            if router_fingerprint != b.fingerprint:
                raise Incompatible(f"switch {name!r} query embeddings come from another encoder ({router_fingerprint})")
            if query_dim != b.embed_dim:
                raise Incompatible(f"switch {name!r} query embeddings are {query_dim}-d, router is {b.embed_dim}-d")

    def add(self, sw: Switch) -> None:
        """Serve ``sw`` (replacing a switch of the same name); cached merges that used the old one go."""
        self._register(sw)
        queries = self._queries_of(sw)
        if queries is not None:
            self.router.add(sw.name, queries)
        else:
            self.router.remove(sw.name)
        self._drop_queries(sw)

    def _register(self, sw: Switch) -> None:
        self.validate(sw)
        sw.to(self.backbone.device)
        with self._lock:
            self._switches[sw.name] = sw
        self.resident.forget(sw.name)
        self.resident.track(sw)
        self.heads.forget(sw.name)
        stale = lambda key: sw.name in key.names and key.hashes().get(sw.name) != sw.content_hash  # noqa: E731
        self.cache.invalidate(stale)
        self.hot.forget(stale)

    @staticmethod
    def _queries_of(sw: Switch, recent: Recent | None = None):
        if sw.queries is not None:
            return sw.queries
        return read_queries(sw, recent) if sw.source is not None and sw.query_count else None

    @staticmethod
    def _drop_queries(sw: Switch) -> None:
        """The router holds its own copy; a switch that can read them again from its file need not."""
        if sw.source is not None:
            sw.queries = None

    def remove(self, name: str) -> None:
        with self._lock:
            if self._switches.pop(name, None) is None:
                raise NotFound(f"no switch named {name!r}")
        self.router.remove(name)
        self.resident.forget(name)
        self.heads.forget(name)
        self.cache.invalidate(lambda key: name in key.names)
        self.hot.forget(lambda key: name in key.names)

    def sync(self, bank: Bank) -> bool:
        """Bring the served set in line with ``bank`` if its generation moved. Returns whether it did.

        Switches are read without their bits (format.read_light): start-up costs their headers, heads
        (checked, then left in their files until a request needs them: heads.py) and query
        embeddings, not the bank's size in bits. The first sync builds the router index in
        one go; later ones change it incrementally, and rebuild it in the background when it drifts."""
        with self._sync_lock, _no_cyclic_gc():
            self.bank = bank
            return self._sync(bank)

    def _sync(self, bank: Bank) -> bool:
        m = bank.manifest()
        if m.generation == self.generation:
            return False
        first = self.generation < 0 and not self.switches
        current = {n: s.content_hash for n, s in self.switches.items()}
        for name in set(current) - set(m.switches):
            self.remove(name)
        for name, info in m.switches.items():
            if current.get(name) == info["content_hash"]:
                continue
            try:
                sw = bank.load(name, light=True, info=info)
                if first:
                    self._register(sw)
                else:
                    self.add(sw)
            except NotFound:
                continue  # removed again meanwhile; the next sync settles it
            except Exception:
                log.exception("switch %s in the bank cannot be served; skipping it", name)
        if first:
            self.router.load(self._query_source, self._query_counts(), background=self.router_ready_exact)
            for sw in self.switches.values():
                self._drop_queries(sw)
        else:
            self.router.rebuild(self._query_source, self._query_counts)
        self.generation = m.generation
        return True

    def _query_counts(self) -> dict[str, int]:
        return {n: sw.query_count or (0 if sw.queries is None else int(sw.queries.shape[0]))
                for n, sw in self.switches.items() if sw.query_count or sw.queries is not None}

    def _query_source(self, names: list[str] | None):
        switches, recent = self.switches, Recent()
        for name in (sorted(switches) if names is None else names):
            sw = switches.get(name)
            if sw is None:
                continue
            try:
                q = self._queries_of(sw, recent)
            except Exception:
                log.exception("query embeddings of switch %s cannot be read; it is left out of routing", name)
                continue
            if q is not None:
                yield name, q


@contextmanager
def _no_cyclic_gc():
    """Pause Python's cyclic garbage collector while a bank is read.

    Reading a big bank creates a few hundred objects per switch (tensor entries, heads), all kept;
    the collector would walk every live object again and again as they pile up (1,000 switches:
    2.1 s to load with it, 1.5 s without). Freed objects are still freed at once by reference
    counting; the collector resumes afterwards.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
