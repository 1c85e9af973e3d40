"""Which combinations are hot enough to deserve a cached merged tower.

A cached tower costs a whole tower's memory and one full merge to build; it pays off only for a
combination that comes back often. Auto-Switch traffic is mostly a few combinations (one per task)
plus a long tail of mixes that come a few times each. A combination of one switch is hot once it
has appeared in ``after`` batches among the recent ones, a mix of several switches once it has
appeared in ``mix_after``; until then its rows go through the one-pass mixed forward with tensors
merged just in time (or as copies over its switches, see mixed_ops.Copies), and it takes no cache
entry. Mixes need more: a tower built for a mix that comes back two or three times costs more
than merging it just in time each time (on the demo tower, a build takes about 26 ms with its
page faults; measured in bench/forward.py). When caching it would evict other combinations, it
is admitted only if it has come more often than each of them (as TinyLFU admits), so that a full
cache of combinations that come every batch is not churned by ones that come now and then. Counts are
halved every ``window`` observations, so a combination that stops coming cools down again and the
table stays bounded (about 2 x ``window`` keys at most).

``after=1`` caches every combination of one switch on first use; ``after=0`` never caches one;
``mix_after`` likewise for mixes. Keys are Combinations (or anything with ``terms``).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable


class HotSet:
    def __init__(self, after: int = 2, mix_after: int = 8, window: int = 4096):
        if after < 0 or mix_after < 0 or window < 1:
            raise ValueError("after and mix_after must be >= 0 and window >= 1")
        self.after, self.mix_after, self.window = int(after), int(mix_after), int(window)
        self._counts: dict[Hashable, int] = {}
        self._seen = 0
        self._lock = threading.Lock()

    def seen(self, keys: Iterable[Hashable]) -> None:
        """Record one batch's distinct combinations."""
        with self._lock:
            for k in keys:
                self._counts[k] = self._counts.get(k, 0) + 1
                self._seen += 1
            if self._seen >= self.window:
                self._seen = 0
                self._counts = {k: c // 2 for k, c in self._counts.items() if c // 2}

    def threshold(self, key) -> int:
        """The batches ``key`` must have come in to be hot (0: never hot)."""
        return self.mix_after if len(key.terms) > 1 else self.after

    def is_hot(self, key: Hashable) -> bool:
        need = self.threshold(key)
        if need == 0:
            return False
        with self._lock:
            return self._counts.get(key, 0) >= need

    def admits(self, key: Hashable, victims: list[Hashable] | None) -> bool:
        """Whether ``key`` deserves a cache entry that would evict ``victims`` (None: it cannot fit)."""
        if victims is None or not self.is_hot(key):
            return False
        with self._lock:
            count = self._counts.get(key, 0)
            return all(self._counts.get(v, 0) < count for v in victims)

    def forget(self, predicate) -> None:
        """Drop the counts of combinations that match (a switch was replaced or removed)."""
        with self._lock:
            self._counts = {k: c for k, c in self._counts.items() if not predicate(k)}

    def __len__(self) -> int:
        return len(self._counts)
