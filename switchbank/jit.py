"""Merged tensors built just in time, for combinations that hold no cached tower.

A mixed forward (mixed.py) asks for each group's tensors operation by operation, in the order
recorded when the mixed tower was built. For a group without a cached tower, this module merges
theta0 + sum_t w_t tau_t for one *segment* of consecutive operations (about ``segment_bytes`` of
weights; a larger operation is a segment of its own; a folded convolution and its norm count as one
operation, MixedTower.merge_order) when the forward first needs it, into that
group's slot of a scratch buffer that is reused from segment to segment and batch to batch, so
the operations read weights written moments before rather than a whole merged tower. A
combination that is not hot costs one merge of the tower per batch, spread over the forward, and
at most ``budget`` bytes of scratch, never a tower-sized allocation or cache entry.
An operation reads every group's tensors before it runs, so each cold group has a slot of its own;
groups beyond what the budget holds merge into fresh tensors instead (one segment each at a time).

On fp32 CPU towers the fused kernel writes straight into the scratch buffer; elsewhere (GPU,
fp16/bf16) each segment is merged with torch ops into fresh tensors, which the device's caching
allocator recycles.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from . import fused
from .combine import Weighted, _contributes, merged_params

SEGMENT_BYTES = 4 << 20  # about what stays in a core's share of the last-level cache
DEFAULT_BUDGET = 256 << 20
ALIGN = 16  # elements: every view in the scratch buffer starts on a 64-byte boundary


class JitMerge:
    SHARES = 4096  # (switch, segment) shares kept: beyond, they are worked out again

    def __init__(self, base: dict[str, torch.Tensor], order: Sequence[tuple], budget: int = DEFAULT_BUDGET,
                 segment_bytes: int = SEGMENT_BYTES):
        self.base = base
        self.budget = int(budget)
        # the forward reads operations in this order; one operation's tensors stay in one segment
        ops = [tuple(n for n in names if n) for names in order]
        self.segments: list[list[str]] = []
        size = 0
        for names in ops:
            b = sum(base[n].numel() * base[n].element_size() for n in names)
            if not self.segments or (size and size + b > segment_bytes):
                self.segments.append([])
                size = 0
            self.segments[-1].extend(names)
            size += b
        self.segment_of = {n: i for i, seg in enumerate(self.segments) for n in seg}
        self.fused = fused.supports(base.values())
        # fused path: element offsets of each tensor inside a slot, and the slot's size
        self._starts = []
        for seg in self.segments:
            sizes = [-(-base[n].numel() // ALIGN) * ALIGN for n in seg]
            self._starts.append(dict(zip(seg, np.cumsum([0] + sizes[:-1]).tolist())))
        self.slot_elems = max((sum(-(-base[n].numel() // ALIGN) * ALIGN for n in seg) for seg in self.segments),
                              default=0)
        # the base tensors' addresses, taken once: they are the backbone's, held in self.base and
        # never replaced (the kernel reads them by address, see fused.merge_at)
        self._plans = [_Plan(np.fromiter((base[n].data_ptr() for n in seg), np.int64, len(seg)),
                             np.fromiter((base[n].numel() for n in seg), np.int64, len(seg)),
                             np.fromiter((self._starts[i][n] for n in seg), np.int64, len(seg)))
                       for i, seg in enumerate(self.segments)]
        self._shares: dict[tuple[int, int], tuple] = {}  # (id(switch), segment) -> (its weak reference, bits' addresses, _Share)
        self._slot_views: dict[tuple[int, int], list[torch.Tensor]] = {}  # views of the scratch buffer
        self._scratch: torch.Tensor | None = None
        self.groups: list[list] = []
        self._slots = 0
        self._segment: list[int] = []  # per group, the segment its merged tensors belong to
        self._merged: list[dict[str, torch.Tensor]] = []
        self.merges = 0  # segment merges done (for tests and benchmarks)

    def begin(self, groups: list[Weighted]) -> None:
        """Start a batch whose cold groups have these weighted switches."""
        self.groups = [[(sw, float(w)) for sw, w in g if float(w) != 0.0] for g in groups]
        n = min(len(self.groups), self.budget // max(1, self.slot_elems * 4))
        self._slots = n
        self._segment = [-1] * len(self.groups)
        self._merged = [{} for _ in self.groups]
        if self.fused and n and (self._scratch is None or self._scratch.numel() < n * self.slot_elems):
            self._scratch, self._slot_views = None, {}  # free the old buffer before taking the new one
            self._scratch = torch.empty(n * self.slot_elems, dtype=torch.float32)

    def end(self) -> None:
        self.groups, self._segment, self._merged = [], [], []

    def get(self, g: int, names: tuple) -> tuple:
        """Group g's merged tensors for ``names`` (None stays None)."""
        real = [n for n in names if n]
        if not real:
            return tuple(None for _ in names)
        seg = self.segment_of[real[0]]
        if self._segment[g] != seg:
            self._segment[g] = -1
            self._merged[g] = {}  # release this group's previous segment first
            self._merged[g] = self._merge(g, seg)
            self._segment[g] = seg
        merged = self._merged[g]
        return tuple(merged.get(n, self.base[n]) if n else None for n in names)

    def _merge(self, g: int, seg: int) -> dict[str, torch.Tensor]:
        self.merges += 1
        weighted = self.groups[g]
        names = self.segments[seg]
        if not self.fused:
            sub = {n: self.base[n] for n in names}
            return {n: t for n, t in merged_params(sub, weighted, kernel=False).items() if t is not sub[n]}
        if g < self._slots:
            return self._merge_fused(seg, weighted, self._scratch, g * self.slot_elems)
        fresh = torch.empty(self.slot_elems, dtype=torch.float32)
        return self._merge_fused(seg, weighted, fresh, 0)

    def _merge_fused(self, seg: int, weighted: list, buffer: torch.Tensor, base_offset: int) -> dict[str, torch.Tensor]:
        """One kernel call writing the group's merged tensors of segment ``seg`` into ``buffer`` from
        ``base_offset``.

        What each switch adds to a segment (which tensors, where their bits lie, their scales) is
        worked out once per switch and segment (:meth:`_share`), and the views of a slot once per
        slot: made afresh for every merge, they took 0.7 ms of each segment's 1.3 ms on the demo
        tower, about 9 ms of a batch of 16 on its Auto-Switch traffic."""
        names, starts = self.segments[seg], self._starts[seg]
        shares = [(share, w) for sw, w in weighted if (share := self._share(sw, seg)).at.size]
        merged: dict[str, torch.Tensor] = {}
        if shares:
            first = shares[0][0].at
            if all(share.at is first or np.array_equal(share.at, first) for share, _ in shares):
                touched, where = first, [slice(None)] * len(shares)
            else:  # switches that leave different tensors untouched
                touched = np.unique(np.concatenate([share.at for share, _ in shares]))
                where = [np.searchsorted(touched, share.at) for share, _ in shares]
            shape = (len(shares), touched.size)
            coef, mask_addr, pos_addr = np.zeros(shape, np.float32), np.zeros(shape, np.int64), np.zeros(shape, np.int64)
            for t, ((share, w), at) in enumerate(zip(shares, where)):
                coef[t, at] = w * share.scale  # in float64, then rounded once, as the torch path does
                mask_addr[t, at], pos_addr[t, at] = share.mask_addr, share.pos_addr
            plan = self._plans[seg]
            out_addr = buffer.data_ptr() + 4 * (base_offset + plan.start[touched])
            fused.merge_at(plan.base_addr[touched], out_addr, plan.numel[touched], mask_addr, pos_addr, coef)
            views = self._views(buffer, base_offset, seg)
            merged = {names[i]: views[i] for i in touched.tolist()}
        for sw, w in weighted:  # 0-dim tensors are stored exactly, not as bits
            for n, d in sw.dense.items():
                if n in starts:
                    t = merged.get(n)
                    merged[n] = (self.base[n] if t is None else t) + w * d.to(self.base[n].dtype)
        return merged

    def _share(self, sw, seg: int) -> _Share:
        """What switch ``sw`` adds to segment ``seg`` (see _Share), its bits checked once."""
        key = (id(sw), seg)
        hit = self._shares.get(key)
        if hit is not None and hit[0]() is sw and hit[1] == (sw.mask.data_ptr(), sw.pos.data_ptr()):
            return hit[2]
        if len(self._shares) >= self.SHARES:
            self._shares.clear()
        emap = sw.entry_map()
        names = self.segments[seg]
        found = [(i, e) for i, n in enumerate(names) if (e := emap.get(n)) is not None and _contributes(e)]
        at, entries = [i for i, _ in found], [e for _, e in found]
        offset = np.asarray([e.offset for e in entries], dtype=np.int64)
        mask_addr, pos_addr = fused.bit_addresses(sw.mask, sw.pos, offset, self._plans[seg].numel[at])
        share = _Share(np.asarray(at, dtype=np.int64), mask_addr, pos_addr,
                       np.asarray([e.scale for e in entries], dtype=np.float64))
        # by a weak reference: a switch evicted from memory must not be kept alive here (its id may
        # then come back on another object, which the reference tells apart)
        self._shares[key] = (weakref.ref(sw), (sw.mask.data_ptr(), sw.pos.data_ptr()), share)
        return share

    def _views(self, buffer: torch.Tensor, base_offset: int, seg: int) -> list[torch.Tensor]:
        """The segment's tensors' views in ``buffer`` from ``base_offset``: kept for the scratch
        buffer's slots, made afresh for any other buffer."""
        key = (base_offset, seg)
        scratch = buffer is self._scratch
        if scratch and key in self._slot_views:
            return self._slot_views[key]
        plan = self._plans[seg]
        views = [buffer[lo:lo + k].view(self.base[n].shape)
                 for n, lo, k in zip(self.segments[seg], (base_offset + plan.start).tolist(), plan.numel.tolist())]
        if scratch:
            self._slot_views[key] = views
        return views


class _Plan(NamedTuple):
    """A segment's tensors, in its order: their base tensors' addresses, sizes and offsets in a slot."""

    base_addr: np.ndarray
    numel: np.ndarray
    start: np.ndarray


class _Share(NamedTuple):
    """What one switch adds to one segment: the positions (in the segment) of the tensors it
    changes, their bits' addresses and their scales."""

    at: np.ndarray
    mask_addr: np.ndarray
    pos_addr: np.ndarray
    scale: np.ndarray
