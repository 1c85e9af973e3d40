"""The inference engine: route -> group by combination -> one forward -> heads.

Each request in a batch is routed on its own (a named task, explicit weights, or Auto-Switch);
requests with equal combinations form one group. Weights are never averaged across requests.

How a batch runs: one mixed forward (mixed.py) for the whole batch, each parameterised operation
per group, on cached merged weights for hot combinations and on weights merged just in time
(jit.py) for the rest (a batch of one group runs every operation whole). Which combinations get
cached weights is decided by a HotSet (hot.py), so a mix that is not hot never takes a tower-sized
cache entry. Towers the mixed forward cannot run fall back to one forward per group, each on a
cached replica of the tower (logged once at start-up and counted in ``stats``).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from . import fused, mixed, packing
from .arena import run_apart
from .backbone import Backbone
from .cache import DeltaCache
from .combine import merged_params, owned_bytes
from .errors import InvalidInput, NotFound, SwitchChanged
from .heads import Heads
from .hot import HotSet
from .jit import DEFAULT_BUDGET, JitMerge
from .resident import Residency
from .routing import DEVICE_BYTES, Router
from .switchset import SwitchSet
from .types import Combination, Switch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """How one request chooses its weights: a task name, explicit weights, or neither (Auto-Switch)."""

    task: str | None = None
    weights: dict[str, float] | None = None


@dataclass
class Merged:
    """A cached combination: its merged weights by name (those the mixed forward reads), what the
    mixed forward derives from them, and a replica of the tower where there is no mixed forward."""

    module: torch.nn.Module | None  # None where the mixed forward runs every batch
    params: dict[str, torch.Tensor]
    memo: dict  # tensors the mixed forward derives from the weights (folded convolutions)


@dataclass
class EngineStats:
    batches_cached: int = 0  # one group, on its cached weights
    batches_mixed: int = 0  # several groups, or tensors merged just in time
    batches_grouped: int = 0  # one forward per group (towers the mixed forward does not support)
    groups_hot: int = 0  # groups served from a cached tower
    groups_cold: int = 0  # groups served with tensors merged just in time
    rows: int = 0
    copies: int = 0  # rows run as copies of a request, one per switch of its mix (mixed_ops.Copies)
    mixed_forward: bool = False
    mixed_unsupported: str = ""
    hot_tracked: int = 0
    warm: bool = False  # the mixed tower is built and the kernels are loaded (Engine.warm_up)


@dataclass
class Result:
    head: str
    weights: dict[str, float]
    mode: str  # "task", "weights" or "auto"
    probs: torch.Tensor  # [classes], softmax of the head's logits
    classes: list[str]
    logits: torch.Tensor | None = None  # [classes]


SYNC_RETRIES = 5  # a batch follows a bank that keeps changing under it this many times, then fails


class Hashes:
    """Content hashes by switch name, read from the switches when asked (a bank may hold thousands)."""

    def __init__(self, switches: dict[str, Switch]):
        self.switches = switches

    def __contains__(self, name) -> bool:
        return name in self.switches

    def __getitem__(self, name: str) -> str:
        return self.switches[name].content_hash


class Engine(SwitchSet):
    def __init__(self, backbone: Backbone, *, k: int = 10, cache_bytes: int = 1 << 30, router_metric: str = "l2",
                 hot_after: int = 2, hot_mix_after: int = 8, mixed_forward: bool = True,
                 scratch_bytes: int = DEFAULT_BUDGET, resident_bytes: int = 1 << 30,
                 router_exact_max: int | None = None, router_nprobe: int | None = None,
                 router_ready_exact: bool = True, router_device_bytes: int = DEVICE_BYTES,
                 head_bytes: int = 128 << 20, warm: bool = True):
        """``router_ready_exact``: the first sync routes a bank past the router's exact limit by
        exact search as soon as it is read, and builds its IVF index in the background
        (routing.Router.load); off, the sync returns once the IVF index is built.
        ``router_device_bytes``: where the backbone is on an accelerator, the router's exact index
        is held and scanned there up to this many bytes (0: on the CPU)."""
        super().__init__()
        self.router_ready_exact = router_ready_exact
        self.backbone = backbone
        self.router = Router(backbone.embed_dim, k, router_metric, exact_max=router_exact_max, nprobe=router_nprobe,
                             device=None if backbone.device.type == "cpu" else backbone.device,
                             device_bytes=router_device_bytes)
        self.resident = Residency(resident_bytes, backbone.device)
        self.heads = Heads(head_bytes, backbone.device)
        self.cache = DeltaCache(cache_bytes)
        self.hot = HotSet(hot_after, hot_mix_after)
        self._stats = EngineStats()
        self._stats_lock = threading.Lock()
        self.mixed: mixed.MixedTower | None = None
        self.jit: JitMerge | None = None
        self._mixed_lock = threading.Lock()  # the mixed tower and the scratch are used by one batch at a time
        self._mixed_forward, self._scratch_bytes = mixed_forward, scratch_bytes
        self._warm_lock = threading.Lock()
        self._warm = False
        self.on_materialise = None  # optional callback(seconds), for metrics
        if warm:
            self.warm_up()

    def warm_up(self) -> None:
        """Build the mixed tower and load the merge and decoding kernels (about a second on a
        CPU), once. An engine made with ``warm=False`` does this on its first batch instead.

        The server warms up before it reports ready: run in a thread after ready, this held the
        interpreter while the server answered its readiness probe, which then came only 0.2 s
        sooner (median of six starts on 1,000 switches) while the first answer came 1.3 s later."""
        if self._warm:
            return
        with self._warm_lock:
            if self._warm:
                return
            backbone = self.backbone
            if fused.supports(backbone.params.values()):
                fused.warm_up()  # before JitMerge asks whether the kernel can merge these weights
            packing.warm_up()  # the kernels that decode a switch's bits on first use
            if self._mixed_forward:
                tower, reason = mixed.build(backbone.model, backbone.params, backbone.buffers, backbone.probe())
                if tower is None:
                    log.warning("one-pass mixed forward unavailable for %s (%s); batches that need several "
                                "combinations run one forward per combination", backbone.arch, reason)
                    self._stats.mixed_unsupported = reason
                else:
                    self.jit = JitMerge(backbone.params, tower.merge_order(), self._scratch_bytes)
                    # the router pass runs the base weights through the mixed tower too, with its
                    # convolutions and norms folded once here
                    self._base_memo, _ = tower.derived(backbone.params)
                    self.mixed = tower
            else:
                self._stats.mixed_unsupported = "disabled"
            self._stats.mixed_forward = self.mixed is not None
            self._stats.warm = self._warm = True

    def pin(self, names: list[str], warm: bool = True) -> None:
        """Keep these switches' bits and heads resident for good and, with ``warm``, build and cache the
        merged weights of each (its T-Switch combination) now rather than on a first request."""
        switches = self.switches
        unknown = sorted(set(names) - set(switches))
        if unknown:
            raise NotFound(f"cannot pin unknown switch {unknown[0]!r}")
        self.resident.pin([switches[n] for n in names])
        self.heads.pin([switches[n] for n in names])
        if warm:
            hashes = Hashes(switches)
            for n in names:
                combo = Combination.of({n: 1}, hashes)
                self.hot.seen([combo] * max(1, self.hot.after))
                with self.cache.lease(combo, self._make(combo, switches)):
                    pass

    # --- inference ------------------------------------------------------------------------
    def resolve(self, routes: list[Route], x: torch.Tensor, switches: dict[str, Switch]) -> list[tuple[Combination, str]]:
        """The combination and mode of each request; runs the router pass for Auto-Switch ones."""
        hashes = Hashes(switches)
        out: list[tuple[Combination, str] | None] = [None] * len(routes)
        auto = []
        for i, r in enumerate(routes):
            if r.task is not None:
                if r.task not in switches:
                    raise NotFound(f"no switch named {r.task!r}")
                out[i] = (Combination.of({r.task: 1}, hashes), "task")
            elif r.weights is not None:
                unknown = sorted(set(r.weights) - set(switches))
                if unknown:
                    raise NotFound(f"no switch named {unknown[0]!r}")
                combo = Combination.of(r.weights, hashes)
                if not combo.terms:
                    raise InvalidInput("weights must not all be zero")
                out[i] = (combo, "weights")
            else:
                auto.append(i)
        if auto:
            if len(self.router) == 0:
                raise NotFound("no switch with query examples is loaded, so requests must name a task")
            emb = self.embed(x if len(auto) == len(routes) else x[auto])
            for i, w in zip(auto, self.router.weights(emb.cpu())):
                # The router may still hold a switch removed a moment ago: keep what is served.
                w = {n: c for n, c in w.items() if n in switches}
                if not w:
                    raise NotFound("the switches the router chose are no longer loaded; retry")
                out[i] = (Combination.of(w, hashes), "auto")
        return out  # type: ignore[return-value]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Router embeddings (the pretrained encoder) of a preprocessed batch."""
        self.warm_up()
        if self.mixed is None:
            return self.backbone.forward(x)
        base = self.backbone.params

        def fetch(g, names):
            return tuple(base[n] if n else None for n in names)

        with self._mixed_lock:
            groups = mixed.Groups([(0, x.shape[0])], fetch, self.backbone.device, [self._base_memo])
            return self.backbone.forward_mixed(x, self.mixed, groups)

    def materialise(self, combo: Combination, switches: dict[str, Switch]) -> tuple[Merged, int]:
        """The merged weights of ``combo`` as the forward reads them, and the bytes they own (the
        cache's unit): for the mixed forward, its tensors with convolutions and their norms
        folded; otherwise a replica of the tower holding them. Built on a thread of its own, so
        that cached towers do not take the memory the forward reuses (arena.py)."""
        self.warm_up()
        return run_apart(self._materialise, combo, switches)

    def _materialise(self, combo: Combination, switches: dict[str, Switch]) -> tuple[Merged, int]:
        t0 = time.perf_counter()
        base = self.backbone.params
        weighted = [(switches[name], float(w)) for name, _, w in combo.terms]
        with self.resident.use([sw for sw, _ in weighted]):
            params = merged_params(base, weighted)
        if self.mixed is not None:
            memo, replaced = self.mixed.derived(params)
            params = {n: t for n, t in params.items() if n not in replaced}
            merged = Merged(None, params, memo)
        else:
            memo = {}
            merged = Merged(self.backbone.replica(params), params, memo)
        if self.backbone.device.type == "cuda":
            torch.cuda.synchronize()
        if self.on_materialise:
            self.on_materialise(time.perf_counter() - t0)
        derived = sum(t.numel() * t.element_size() for pair in memo.values() for t in pair if t is not None)
        return merged, owned_bytes(params, base) + derived

    def stats(self) -> EngineStats:
        with self._stats_lock:
            s = EngineStats(**vars(self._stats))
        s.hot_tracked = len(self.hot)
        return s

    def _count(self, **inc) -> None:
        with self._stats_lock:
            for k, v in inc.items():
                setattr(self._stats, k, getattr(self._stats, k) + v)

    def run(self, x: torch.Tensor, routes: list[Route]) -> list[Result]:
        """Classify a preprocessed batch ``x`` [B, 3, H, W]; one Route per row."""
        if x.shape[0] != len(routes):
            raise InvalidInput(f"{x.shape[0]} images but {len(routes)} routes")
        for attempt in range(SYNC_RETRIES + 1):
            try:
                return self._run(x, routes)
            except SwitchChanged:
                # another process replaced or removed a switch in the bank after it was listed here
                # and before its bits were first needed: follow the bank now, not at the next sync
                if attempt == SYNC_RETRIES or self.bank is None or not self.sync(self.bank):
                    raise
        raise AssertionError("unreachable")

    def _run(self, x: torch.Tensor, routes: list[Route]) -> list[Result]:
        self.warm_up()
        switches = self.switches
        resolved = self.resolve(routes, x, switches)
        groups: dict[Combination, list[int]] = {}
        for i, (combo, _) in enumerate(resolved):
            groups.setdefault(combo, []).append(i)
        self.hot.seen(groups)
        if self.mixed is None:
            feats = self._grouped(x, groups, switches)
        else:
            feats = self._one_pass(x, groups, switches)
        results: list[Result | None] = [None] * len(routes)
        for combo, idx in groups.items():
            top = combo.top()
            head = self.heads.get(switches[top])
            logits = head_logits(head, feats[idx] if len(idx) < len(routes) else feats).cpu()
            if not torch.isfinite(logits).all():
                raise InvalidInput(f"the weights {combo.weights()} give non-finite scores; use smaller weights")
            probs = logits.softmax(-1)
            for row, i in enumerate(idx):
                results[i] = Result(top, combo.weights(), resolved[i][1], probs[row], head.classes, logits[row])
        return results  # type: ignore[return-value]

    def _make(self, combo: Combination, switches: dict[str, Switch]):
        return lambda: self.materialise(combo, switches)

    def _grouped(self, x: torch.Tensor, groups: dict[Combination, list[int]], switches) -> torch.Tensor:
        """One forward per group, each on its cached tower (built on a miss)."""
        feats = None
        for combo, idx in groups.items():
            xs = x if len(idx) == x.shape[0] else x[idx]  # one group: no copy of the batch
            with self.cache.lease(combo, self._make(combo, switches)) as merged:
                f = self.backbone.forward(xs, merged.module)
            if feats is None:
                feats = f.new_empty((x.shape[0], f.shape[1]))
            feats[idx] = f
        self._count(batches_grouped=1, groups_hot=len(groups), rows=x.shape[0])
        return feats

    def _one_pass(self, x: torch.Tensor, groups: dict[Combination, list[int]], switches) -> torch.Tensor:
        """One mixed forward for the whole batch (a lone group runs every operation whole).

        Each combination runs on its cached weights where it has them. In a tower that takes
        copies (MixedTower.decomposable), a mix without them runs as copies of its rows in the
        groups of its switches (and of the base weights, for what its weights leave to them),
        so it shares their weights, cached or merged once for the batch, instead of having
        weights merged for it alone; elsewhere it gets weights merged just in time."""
        with ExitStack() as stack:
            hashes = Hashes(switches)
            units: dict[object, list[tuple[int, float]]] = {}  # a group's key -> (request, weight)
            sources: dict[object, Merged | None] = {}
            split: set[int] = set()  # the requests that run as copies
            for combo, idx in groups.items():
                src = sources[combo] = self._lease(stack, combo, switches)
                if src is not None or not self.mixed.decomposable or _alone(combo):
                    units.setdefault(combo, []).extend((i, 1.0) for i in idx)
                    continue
                del sources[combo]
                parts = [(Combination.of({n: 1}, hashes), w) for n, _, w in combo.terms]
                rest = 1 - sum(w for _, w in parts)
                # weights sent as decimals rarely sum to 1 exactly (0.7 + 0.3 as binary fractions
                # leaves about 1e-17): a base group for that would cost rows and change nothing
                if abs(rest) > REST_MIN:
                    parts.append((BASE, rest))
                for key, w in parts:
                    units.setdefault(key, []).extend((i, float(w)) for i in idx)
                split.update(idx)
            new = [k for k in units if k not in sources and k is not BASE]
            self.hot.seen(new)  # a switch its mixes use often gets cached weights too
            for key in new:
                sources[key] = self._lease(stack, key, switches)
            keys = list(units)
            cold_keys = [k for k in keys if k is not BASE and sources[k] is None]
            hot = len(keys) - len(cold_keys)
            self._count(groups_hot=hot, groups_cold=len(cold_keys), rows=x.shape[0])
            if len(keys) == 1 and hot:
                self._count(batches_cached=1)
            else:
                self._count(batches_mixed=1)
            order, spans, copy_rows, first = [], [], [], {}
            for key in keys:
                spans.append((len(order), len(order) + len(units[key])))
                for i, w in units[key]:
                    first.setdefault(i, len(order))
                    if i in split:
                        copy_rows.append((len(order), i, w))
                    order.append(i)
            cold = [[(switches[n], float(w)) for n, _, w in k.terms] for k in cold_keys]
            slot = {k: j for j, k in enumerate(cold_keys)}
            jit, base = self.jit, self.backbone.params
            srcs = [sources.get(k) for k in keys]

            def fetch(g: int, names: tuple) -> tuple:
                key, src = keys[g], srcs[g]
                if key is BASE:
                    return tuple(base[n] if n else None for n in names)
                if src is None:
                    return jit.get(slot[key], names)
                return tuple(src.params[n] if n else None for n in names)

            self._count(copies=len(copy_rows))
            sorted_x = x if order == list(range(x.shape[0])) else x[order]
            needed = list({sw.name: sw for g in cold for sw, _ in g}.values())
            device = self.backbone.device
            memo = [self._base_memo if k is BASE else {} if s is None else s.memo for k, s in zip(keys, srcs)]
            layout = mixed.Groups(spans, fetch, device, memo, mixed.Copies.of(copy_rows, device))
            with self.resident.use(needed), self._mixed_lock:
                jit.begin(cold)
                try:
                    out = self.backbone.forward_mixed(sorted_x, self.mixed, layout)
                finally:
                    jit.end()
            if sorted_x is x:
                return out
            return out[[first[i] for i in range(x.shape[0])]]

    def _lease(self, stack: ExitStack, combo: Combination, switches) -> Merged | None:
        """The cached weights of ``combo``, built now if it is hot enough and admitted; else None."""
        make = None
        if combo not in self.cache and self.hot.admits(combo, self.cache.victims(self.cache.typical_bytes())):
            make = self._make(combo, switches)
        return stack.enter_context(self.cache.lease(combo, make))


BASE = "base"  # the group of the pretrained weights, where a mix's weights sum to less or more than 1
REST_MIN = 1e-9  # far below float32's resolution (about 1e-7): a mix's output cannot show it


def _alone(combo: Combination) -> bool:
    """A combination that is one switch at weight 1: it has no copies to make."""
    return len(combo.terms) == 1 and combo.terms[0][2] == 1


def head_probs(head, feats: torch.Tensor) -> torch.Tensor:
    return head_logits(head, feats).softmax(-1).cpu()


def head_logits(head, feats: torch.Tensor) -> torch.Tensor:
    f = feats.float()
    if head.normalize:
        f = torch.nn.functional.normalize(f, dim=-1)
    w = head.weight.to(f.device, torch.float32)
    logits = f @ w.T
    if head.bias is not None:
        logits = logits + head.bias.to(f.device, torch.float32)
    return logits

