"""Which switches hold their bits in memory.

A bank's switches are listed at start-up from their headers (metadata, scales, head); their bit
planes (2 bits per parameter) are read and decoded from the file when a batch first needs them,
and kept under a byte budget, least recently used first out. Pinned switches are never evicted, nor
are switches that have no file to be read again from (added in-process). A batch holds the switches
it uses for its duration, so nothing it reads is evicted under it; concurrent batches that need the
same cold switch load it once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import SwitchChanged, Unavailable
from .format import load_bits
from .types import Switch


@dataclass
class ResidentStats:
    budget_bytes: int
    resident_bytes: int
    resident: int
    pinned: int
    loads: int
    evictions: int
    load_seconds_total: float


class Residency:
    def __init__(self, budget_bytes: int, device=None, on_load: Callable[[float], None] | None = None):
        self.budget = int(budget_bytes)
        self.device = device
        self.on_load = on_load
        self._order: OrderedDict[str, Switch] = OrderedDict()  # loaded switches, least recently used first
        # each tracked switch's bytes as counted, and their sum: every batch checks the budget, and
        # summing thousands of switches for it took milliseconds
        self._size: dict[str, int] = {}
        self._total = 0
        self._holds: dict[str, int] = {}
        self.pinned: set[str] = set()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = self.evictions = 0
        self.load_seconds = 0.0

    def _bytes(self) -> int:
        return self._total

    def _touch(self, sw: Switch) -> None:
        """Mark ``sw`` the most recently used, tracking it (in place of any switch of its name)
        where it is not yet. Lock held."""
        if self._order.get(sw.name) is sw:
            self._order.move_to_end(sw.name)
        else:
            self._put(sw)

    def _put(self, sw: Switch) -> None:
        """Track ``sw`` (in place of any switch of its name) as the most recently used. Lock held."""
        self._drop(sw.name)
        self._order[sw.name] = sw
        self._size[sw.name] = size = sw.resident_bytes()
        self._total += size

    def _drop(self, name: str) -> None:
        """Stop tracking ``name``. Lock held."""
        if self._order.pop(name, None) is not None:
            self._total -= self._size.pop(name)

    @contextmanager
    def use(self, switches: list[Switch]) -> Iterator[None]:
        """Load what is not resident, and keep all of ``switches`` resident until the block ends."""
        names = [sw.name for sw in switches]
        with self._lock:
            for n in names:
                self._holds[n] = self._holds.get(n, 0) + 1
        try:
            for sw in switches:
                self._ensure(sw)
            yield
        finally:
            with self._lock:
                for n in names:
                    self._holds[n] -= 1
                    if not self._holds[n]:
                        del self._holds[n]
                self._evict()

    def _ensure(self, sw: Switch) -> None:
        with self._lock:
            if sw.loaded:
                self._touch(sw)
                return
            gate = self._loading.setdefault(sw.name, threading.Lock())
        with gate:  # one load per switch, however many batches want it
            if not sw.loaded:
                t0 = time.perf_counter()
                try:
                    load_bits(sw)
                except Exception as exc:
                    kind = SwitchChanged if isinstance(exc, SwitchChanged) else Unavailable
                    raise kind(f"switch {sw.name!r} cannot be loaded from its file: {exc}") from None
                if self.device is not None:
                    sw.to(self.device)
                dt = time.perf_counter() - t0
                with self._lock:
                    self.loads += 1
                    self.load_seconds += dt
                if self.on_load:
                    self.on_load(dt)
        with self._lock:
            self._touch(sw)

    def _evict(self) -> None:
        """Unload least recently used switches until within budget. Lock held."""
        if self._total <= self.budget:  # the common case: no list of every resident switch to make
            return
        for name in list(self._order):
            if self._total <= self.budget:
                return
            sw = self._order[name]
            if name in self.pinned or name in self._holds or sw.source is None:
                continue
            self._drop(name)
            sw.mask = sw.pos = None
            self.evictions += 1

    def forget(self, name: str) -> None:
        """A switch was removed or replaced: stop tracking its old bits."""
        with self._lock:
            self._drop(name)
            self._loading.pop(name, None)

    def track(self, sw: Switch) -> None:
        """Count a switch that arrives with its bits loaded."""
        if sw.loaded:
            with self._lock:
                self._put(sw)
                self._evict()

    def pin(self, switches: list[Switch]) -> None:
        """Load these switches and never evict them."""
        with self._lock:
            self.pinned.update(sw.name for sw in switches)
        for sw in switches:
            self._ensure(sw)

    def stats(self) -> ResidentStats:
        with self._lock:
            return ResidentStats(self.budget, self._bytes(), len(self._order), len(self.pinned & set(self._order)),
                                 self.loads, self.evictions, self.load_seconds)

    def per_switch(self) -> dict[str, dict]:
        with self._lock:
            order = list(self._order)
            return {n: {"resident_bytes": self._order[n].resident_bytes(), "pinned": n in self.pinned,
                        "in_use": n in self._holds, "recency": len(order) - i} for i, n in enumerate(order)}
