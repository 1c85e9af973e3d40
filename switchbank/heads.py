"""Which classification heads are in memory.

A switch listed from a bank file keeps its head as a listing (class names, width, where its
weights lie in the file): a head with hundreds of classes can outweigh the switch's query
embeddings, and a bank of thousands of switches would otherwise hold every one of them. A request
needs the head of its top switch; it is read from the file then (about 40 microseconds for a demo
head) and kept under a byte budget, least recently used first out. Heads of pinned switches
are never dropped; a switch added in-process keeps its own head.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from .errors import SwitchChanged, Unavailable
from .format import read_head
from .types import Head, Switch


@dataclass
class HeadStats:
    budget_bytes: int
    head_bytes: int
    heads: int
    loads: int
    evictions: int
    load_seconds_total: float


class Heads:
    def __init__(self, budget_bytes: int, device=None):
        self.budget = int(budget_bytes)
        self.device = device
        self._order: OrderedDict[str, tuple[str, Head]] = OrderedDict()  # name -> (content hash, head)
        self._bytes = 0
        self.pinned: set[str] = set()
        self._lock = threading.Lock()
        self.loads = self.evictions = 0
        self.load_seconds = 0.0

    def get(self, sw: Switch) -> Head:
        """``sw``'s head with its weights, read from its file if they are not in memory."""
        head = sw.head
        if head is None or not head.listed:
            return head
        name = sw.name
        with self._lock:
            hit = self._order.get(name)
            if hit is not None and hit[0] == sw.content_hash:
                self._order.move_to_end(name)
                return hit[1]
        # read outside the lock: two batches wanting the same cold head read it twice, which
        # costs less than making every other head wait for one file read
        t0 = time.perf_counter()
        try:
            head = read_head(sw)
        except Exception as exc:
            kind = SwitchChanged if isinstance(exc, SwitchChanged) else Unavailable
            raise kind(f"the head of switch {sw.name!r} cannot be read from its file: {exc}") from None
        if self.device is not None and head.weight.device != self.device:
            head.weight = head.weight.to(self.device)
            head.bias = None if head.bias is None else head.bias.to(self.device)
        with self._lock:
            self.loads += 1
            self.load_seconds += time.perf_counter() - t0
            old = self._order.get(name)
            if old is None or old[0] != sw.content_hash:
                self._bytes += head.nbytes - (0 if old is None else old[1].nbytes)
                self._order[name] = (sw.content_hash, head)
            self._order.move_to_end(name)
            self._evict()
            return self._order[name][1] if name in self._order else head

    def _evict(self) -> None:
        """Drop least recently used heads until within budget, the newest kept. Lock held."""
        if self._bytes <= self.budget:  # the common case: no list of every held head to make
            return
        for name in list(self._order)[:-1]:
            if self._bytes <= self.budget:
                return
            if name in self.pinned:
                continue
            self._bytes -= self._order.pop(name)[1].nbytes
            self.evictions += 1

    def pin(self, switches: list[Switch]) -> None:
        """Read these switches' heads and never drop them."""
        with self._lock:
            self.pinned.update(sw.name for sw in switches)
        for sw in switches:
            self.get(sw)

    def forget(self, name: str) -> None:
        """A switch was removed or replaced: drop its head."""
        with self._lock:
            old = self._order.pop(name, None)
            if old is not None:
                self._bytes -= old[1].nbytes

    def stats(self) -> HeadStats:
        with self._lock:
            return HeadStats(self.budget, self._bytes, len(self._order), self.loads, self.evictions, self.load_seconds)

    def per_switch(self) -> dict[str, int]:
        """Bytes of head in memory per switch whose head was read from its file."""
        with self._lock:
            return {name: head.nbytes for name, (_, head) in self._order.items()}
