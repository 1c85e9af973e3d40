"""A byte-bounded LRU of materialised combinations.

Entries are pinned while a batch uses them (``with cache.lease(key, make) as params``) and are
never evicted while pinned. Eviction drops the cache's only reference, so the memory is returned
as soon as the last in-flight user is done. A combination larger than the whole budget is built,
served and dropped without being cached ("bypass").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    value: Any
    nbytes: int
    pins: int = 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    invalidations: int = 0
    bypasses: int = 0
    entries: int = 0
    bytes: int = 0
    capacity_bytes: int = 0


class DeltaCache:
    """LRU keyed by a canonical Combination; the factory returns (value, nbytes)."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError("cache capacity must be a positive number of bytes")
        self.capacity = int(capacity_bytes)
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Event] = {}
        self._stats = CacheStats(capacity_bytes=self.capacity)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def victims(self, nbytes: int) -> list[Hashable] | None:
        """The keys that caching ``nbytes`` more would evict, least recently used first (none are
        evicted here), or None when it cannot fit even with every unpinned entry gone."""
        with self._lock:
            if nbytes > self.capacity:
                return None
            need = self._bytes + nbytes - self.capacity
            out = []
            for key, entry in self._entries.items():
                if need <= 0:
                    break
                if entry.pins == 0:
                    out.append(key)
                    need -= entry.nbytes
            return out if need <= 0 else None

    def typical_bytes(self) -> int:
        """The size of the most recently cached entry (0 when empty): every entry of one tower has
        about the same size, so this is what the next one will take."""
        with self._lock:
            return next(reversed(self._entries.values())).nbytes if self._entries else 0

    def stats(self) -> CacheStats:
        with self._lock:
            s = CacheStats(**vars(self._stats))
            s.entries, s.bytes = len(self._entries), self._bytes
            return s

    @contextmanager
    def lease(self, key: Hashable, make: Callable[[], tuple[Any, int]] | None) -> Iterator[Any]:
        """Yield the value for ``key``, building it with ``make`` on a miss; pinned meanwhile.
        With ``make=None`` a miss yields None and builds nothing (nor counts as a miss)."""
        entry = self._acquire(key, make)
        if entry is None:
            yield None
            return
        try:
            yield entry.value
        finally:
            with self._lock:
                entry.pins -= 1
                self._evict_to(self.capacity)

    def _acquire(self, key: Hashable, make: Callable[[], tuple[Any, int]] | None) -> _Entry | None:
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    entry.pins += 1
                    self._stats.hits += 1
                    return entry
                waiting = self._building.get(key)
                if waiting is None and make is None:
                    return None
                if waiting is None:
                    self._building[key] = threading.Event()
                    self._stats.misses += 1
                    break
            waiting.wait()  # another thread is building the same combination: share its result
        try:
            value, nbytes = make()
        finally:
            with self._lock:
                done = self._building.pop(key)
        entry = _Entry(value, int(nbytes), pins=1)
        with self._lock:
            if entry.nbytes > self.capacity:
                self._stats.bypasses += 1
            else:
                self._evict_to(self.capacity - entry.nbytes)
                if self._bytes + entry.nbytes <= self.capacity:
                    self._entries[key] = entry
                    self._bytes += entry.nbytes
                else:  # everything left is pinned by in-flight batches
                    self._stats.bypasses += 1
        done.set()
        return entry

    def _evict_to(self, limit: int) -> None:
        """Evict unpinned entries, least recently used first, until bytes <= limit. Lock held."""
        for key in list(self._entries):
            if self._bytes <= limit:
                return
            entry = self._entries[key]
            if entry.pins == 0:
                self._drop(key)
                self._stats.evictions += 1

    def _drop(self, key: Hashable) -> None:
        self._bytes -= self._entries.pop(key).nbytes

    def invalidate(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose key matches; in-flight leases keep their value until released."""
        with self._lock:
            doomed = [k for k in self._entries if predicate(k)]
            for k in doomed:
                self._drop(k)
            self._stats.invalidations += len(doomed)
            return len(doomed)

    def clear(self) -> None:
        self.invalidate(lambda _k: True)
