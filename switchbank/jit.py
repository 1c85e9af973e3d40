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

from collections.abc import Sequence

import numpy as np
import torch

from . import fused
from .combine import Weighted, _contributes, merged_params

SEGMENT_BYTES = 4 << 20  # about what stays in a core's share of the last-level cache
DEFAULT_BUDGET = 256 << 20
ALIGN = 16  # elements: every view in the scratch buffer starts on a 64-byte boundary


class JitMerge:
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
            self._scratch = None  # free the old buffer before taking the new one
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
            return self._merge_fused(names, weighted, self._scratch, g * self.slot_elems, self._starts[seg])
        fresh = torch.empty(self.slot_elems, dtype=torch.float32)
        return self._merge_fused(names, weighted, fresh, 0, self._starts[seg])

    def _merge_fused(self, names: list[str], weighted: list, buffer: torch.Tensor, base_offset: int,
                     starts: dict) -> dict[str, torch.Tensor]:
        """One kernel call writing the group's merged tensors into ``buffer`` from ``base_offset``."""
        maps = [sw.entry_map() for sw, _ in weighted]
        touched = [n for n in names if any((e := m.get(n)) is not None and _contributes(e) for m in maps)]
        slot = {n: i for i, n in enumerate(touched)}
        outs = []
        for n in touched:
            lo = base_offset + starts[n]
            outs.append(buffer[lo:lo + self.base[n].numel()])
        terms = []
        for (sw, w), emap in zip(weighted, maps):
            idx, offset, coef = [], [], []
            for n in touched:
                e = emap.get(n)
                if e is None or not _contributes(e):
                    continue
                idx.append(slot[n])
                offset.append(e.offset)
                coef.append(w * e.scale)
            if idx:
                terms.append(fused.Term(sw.mask, sw.pos, np.asarray(idx, dtype=np.int64),
                                        np.asarray(offset, dtype=np.int64), np.asarray(coef, dtype=np.float32)))
        merged = {}
        if outs:
            fused.merge([self.base[n] for n in touched], terms, out=outs)
            merged = {n: t.view(self.base[n].shape) for n, t in zip(touched, outs)}
        for sw, w in weighted:  # 0-dim tensors are stored exactly, not as bits
            for n, d in sw.dense.items():
                if n in slot or n in starts:
                    t = merged.get(n)
                    merged[n] = (self.base[n] if t is None else t) + w * d.to(self.base[n].dtype)
        return merged
