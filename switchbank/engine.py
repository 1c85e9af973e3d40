"""The inference engine: route -> group by combination -> cached merged weights -> forward -> head.

Each request in a batch is routed on its own (a named task, explicit weights, or Auto-Switch);
requests with equal combinations form one group, and each group runs once with its merged weights.
Weights are never averaged across requests.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from . import fused
from .backbone import Backbone
from .bank import Bank
from .cache import DeltaCache
from .combine import check_against, merged_params, owned_bytes
from .errors import Incompatible, InvalidInput, NotFound
from .routing import Router
from .types import Combination, Switch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """How one request chooses its weights: a task name, explicit weights, or neither (Auto-Switch)."""

    task: str | None = None
    weights: dict[str, float] | None = None


@dataclass
class Result:
    head: str
    weights: dict[str, float]
    mode: str  # "task", "weights" or "auto"
    probs: torch.Tensor  # [classes], softmax of the head's logits
    classes: list[str]


class Engine:
    def __init__(self, backbone: Backbone, *, k: int = 10, cache_bytes: int = 1 << 30, router_metric: str = "l2"):
        self.backbone = backbone
        self.router = Router(backbone.embed_dim, k, router_metric)
        self.cache = DeltaCache(cache_bytes)
        self._switches: dict[str, Switch] = {}
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # the bank watcher and admin calls may sync at once
        self.generation = -1
        self.on_materialise = None  # optional callback(seconds), for metrics
        if fused.supports(backbone.params.values()):
            fused.warm_up()  # compile the merge kernel now, not inside the first request

    # --- the switch set -------------------------------------------------------------------
    @property
    def switches(self) -> dict[str, Switch]:
        with self._lock:
            return dict(self._switches)

    def validate(self, sw: Switch) -> None:
        """Raise unless ``sw`` can run on this backbone (fingerprint, shapes, head, queries)."""
        b = self.backbone
        if sw.backbone_fingerprint != b.fingerprint:
            raise Incompatible(
                f"switch {sw.name!r} was built for backbone {sw.backbone_fingerprint[:19]}..., "
                f"this server runs {b.fingerprint[:19]}... ({b.arch})"
            )
        check_against(sw, b.params)
        if sw.head is None:
            raise Incompatible(f"switch {sw.name!r} has no classification head; build it with --head")
        if sw.head.weight.shape[1] != b.embed_dim:
            raise Incompatible(f"switch {sw.name!r} head expects {sw.head.weight.shape[1]}-d embeddings, backbone gives {b.embed_dim}")
        if sw.queries is not None:
            if sw.router_fingerprint != b.fingerprint:
                raise Incompatible(f"switch {sw.name!r} query embeddings come from another encoder ({sw.router_fingerprint})")
            if sw.queries.shape[1] != b.embed_dim:
                raise Incompatible(f"switch {sw.name!r} query embeddings are {sw.queries.shape[1]}-d, router is {b.embed_dim}-d")

    def add(self, sw: Switch) -> None:
        """Serve ``sw`` (replacing a switch of the same name); cached merges that used the old one go."""
        self.validate(sw)
        sw.to(self.backbone.device)
        with self._lock:
            self._switches[sw.name] = sw
        if sw.queries is not None:
            self.router.add(sw.name, sw.queries)
        else:
            self.router.remove(sw.name)
        self.cache.invalidate(lambda key: sw.name in key.names and key.hashes().get(sw.name) != sw.content_hash)

    def remove(self, name: str) -> None:
        with self._lock:
            if self._switches.pop(name, None) is None:
                raise NotFound(f"no switch named {name!r}")
        self.router.remove(name)
        self.cache.invalidate(lambda key: name in key.names)

    def sync(self, bank: Bank) -> bool:
        """Bring the served set in line with ``bank`` if its generation moved. Returns whether it did."""
        with self._sync_lock:
            return self._sync(bank)

    def _sync(self, bank: Bank) -> bool:
        m = bank.manifest()
        if m.generation == self.generation:
            return False
        current = {n: s.content_hash for n, s in self.switches.items()}
        for name in set(current) - set(m.switches):
            self.remove(name)
        for name, info in m.switches.items():
            if current.get(name) != info["content_hash"]:
                try:
                    self.add(bank.load(name))
                except NotFound:
                    continue  # removed again meanwhile; the next sync settles it
                except Exception:
                    log.exception("switch %s in the bank cannot be served; skipping it", name)
        self.generation = m.generation
        return True

    # --- inference ------------------------------------------------------------------------
    def resolve(self, routes: list[Route], x: torch.Tensor, switches: dict[str, Switch]) -> list[tuple[Combination, str]]:
        """The combination and mode of each request; runs the router pass for Auto-Switch ones."""
        hashes = {n: s.content_hash for n, s in switches.items()}
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
            emb = self.backbone.forward(x if len(auto) == len(routes) else x[auto])
            for i, w in zip(auto, self.router.weights(emb.cpu())):
                # The router may still hold a switch removed a moment ago: keep what is served.
                w = {n: c for n, c in w.items() if n in switches}
                if not w:
                    raise NotFound("the switches the router chose are no longer loaded; retry")
                out[i] = (Combination.of(w, hashes), "auto")
        return out  # type: ignore[return-value]

    def materialise(self, combo: Combination, switches: dict[str, Switch]) -> tuple[torch.nn.Module, int]:
        """A module with the merged weights of ``combo`` and the bytes it owns (the cache's unit)."""
        t0 = time.perf_counter()
        base = self.backbone.params
        params = merged_params(base, [(switches[name], float(w)) for name, _, w in combo.terms])
        module = self.backbone.replica(params)
        if self.backbone.device.type == "cuda":
            torch.cuda.synchronize()
        if self.on_materialise:
            self.on_materialise(time.perf_counter() - t0)
        return module, owned_bytes(params, base)

    def run(self, x: torch.Tensor, routes: list[Route]) -> list[Result]:
        """Classify a preprocessed batch ``x`` [B, 3, H, W]; one Route per row."""
        if x.shape[0] != len(routes):
            raise InvalidInput(f"{x.shape[0]} images but {len(routes)} routes")
        switches = self.switches
        resolved = self.resolve(routes, x, switches)
        groups: dict[Combination, list[int]] = {}
        for i, (combo, _) in enumerate(resolved):
            groups.setdefault(combo, []).append(i)
        results: list[Result | None] = [None] * len(routes)
        for combo, idx in groups.items():
            xs = x if len(idx) == len(routes) else x[idx]  # one group: no copy of the batch
            with self.cache.lease(combo, lambda c=combo: self.materialise(c, switches)) as module:
                feats = self.backbone.forward(xs, module)
            top = combo.top()
            head = switches[top].head
            probs = head_probs(head, feats)
            for row, i in enumerate(idx):
                results[i] = Result(top, combo.weights(), resolved[i][1], probs[row], head.classes)
        return results  # type: ignore[return-value]


def head_probs(head, feats: torch.Tensor) -> torch.Tensor:
    f = feats.float()
    if head.normalize:
        f = torch.nn.functional.normalize(f, dim=-1)
    w = head.weight.to(f.device, torch.float32)
    logits = f @ w.T
    if head.bias is not None:
        logits = logits + head.bias.to(f.device, torch.float32)
    return logits.softmax(-1).cpu()

