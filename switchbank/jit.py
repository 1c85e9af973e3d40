"""Merged tensors built just in time, for combinations that hold no cached tower.

A mixed forward (mixed.py) asks for each group's tensors operation by operation, in the order
recorded when the mixed tower was built. For the groups without a cached tower, this module merges
theta0 + sum_t w_t tau_t for a *segment* of consecutive operations at a time, for all those groups
in one pass, into a scratch buffer that is reused from segment to segment and batch to batch. So a
combination that is not hot costs one merge of the tower per batch, spread over the forward, and at
most ``budget`` bytes of scratch, never a tower-sized allocation or cache entry.

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

DEFAULT_BUDGET = 256 << 20
ALIGN = 16  # elements: every view in the scratch buffer starts on a 64-byte boundary


class JitMerge:
    def __init__(self, base: dict[str, torch.Tensor], order: Sequence[tuple], budget: int = DEFAULT_BUDGET):
        self.base = base
        self.budget = int(budget)
        # the forward reads operations in this order; one operation's tensors stay in one segment
        self.ops = [tuple(n for n in names if n) for names in order]
        self.op_of = {n: i for i, names in enumerate(self.ops) for n in names}
        self.op_bytes = np.array([sum(base[n].numel() * base[n].element_size() for n in names) for names in self.ops],
                                 dtype=np.int64)
        self.fused = fused.supports(base.values())
        self._scratch: torch.Tensor | None = None
        self.groups: list[list] = []
        self._bounds: np.ndarray = np.zeros(0, dtype=np.int64)
        self._segment = -1
        self._merged: list[dict[str, torch.Tensor]] = []

    def begin(self, groups: list[Weighted]) -> None:
        """Start a batch whose cold groups have these weighted switches."""
        self.groups = [[(sw, float(w)) for sw, w in g if float(w) != 0.0] for g in groups]
        self._segment = -1
        self._merged = []
        if not self.groups:
            return
        # segments of consecutive operations whose tensors, for every group, fit the budget
        per_group = max(1, self.budget // len(self.groups))
        starts, size = [0], 0
        for i, b in enumerate(self.op_bytes):
            if size and size + b > per_group:
                starts.append(i)
                size = 0
            size += int(b)
        self._bounds = np.array(starts + [len(self.ops)], dtype=np.int64)

    def end(self) -> None:
        self.groups, self._merged, self._segment = [], [], -1

    def get(self, g: int, names: tuple) -> tuple:
        """Group g's merged tensors for ``names`` (None stays None)."""
        real = [n for n in names if n]
        if real:
            seg = int(np.searchsorted(self._bounds, self.op_of[real[0]], side="right")) - 1
            if seg != self._segment:
                self._merge(seg)
        merged = self._merged[g] if self._merged else {}
        return tuple(merged.get(n, self.base[n]) if n else None for n in names)

    def _merge(self, seg: int) -> None:
        names = [n for ops in self.ops[self._bounds[seg]:self._bounds[seg + 1]] for n in ops]
        self._segment = -1
        self._merged = []  # release the previous segment first
        if self.fused:
            self._merged = self._merge_fused(names)
        else:
            sub = {n: self.base[n] for n in names}
            self._merged = [{n: t for n, t in merged_params(sub, g, kernel=False).items() if t is not sub[n]}
                            for g in self.groups]
        self._segment = seg

    def _merge_fused(self, names: list[str]) -> list[dict[str, torch.Tensor]]:
        """One kernel call for every cold group, into views of the scratch buffer."""
        base = [self.base[n] for n in names]
        sizes = [t.numel() for t in base]
        starts = np.cumsum([0] + [-(-s // ALIGN) * ALIGN for s in sizes])
        per_group = int(starts[-1])
        need = per_group * len(self.groups)
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = None
            self._scratch = torch.empty(need, dtype=torch.float32)
        terms, outs, out_names = [], [], []
        for g, weighted in enumerate(self.groups):
            maps = [sw.entry_map() for sw, _ in weighted]
            touched = [i for i, n in enumerate(names)
                       if any((e := m.get(n)) is not None and _contributes(e) for m in maps)]
            slot = {}
            for i in touched:
                slot[names[i]] = len(outs)
                lo = g * per_group + int(starts[i])
                outs.append(self._scratch[lo:lo + sizes[i]])
                out_names.append((g, names[i]))
            for (sw, w), emap in zip(weighted, maps):
                idx, offset, coef = [], [], []
                for i in touched:
                    e = emap.get(names[i])
                    if e is None or not _contributes(e):
                        continue
                    idx.append(slot[names[i]])
                    offset.append(e.offset)
                    coef.append(w * e.scale)
                if idx:
                    terms.append(fused.Term(sw.mask, sw.pos, np.asarray(idx, dtype=np.int64),
                                            np.asarray(offset, dtype=np.int64), np.asarray(coef, dtype=np.float32)))
        merged: list[dict[str, torch.Tensor]] = [{} for _ in self.groups]
        if outs:
            fused.merge([self.base[n] for _, n in out_names], terms, out=outs)
            for (g, n), t in zip(out_names, outs):
                merged[g][n] = t.view(self.base[n].shape)
        for g, weighted in enumerate(self.groups):  # 0-dim tensors are stored exactly, not as bits
            for sw, w in weighted:
                for n, d in sw.dense.items():
                    if n in names:
                        t = merged[g].get(n)
                        merged[g][n] = (self.base[n] if t is None else t) + w * d.to(self.base[n].dtype)
        return merged
