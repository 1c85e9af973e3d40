"""Materialising merged image-tower parameters from weighted switches.

theta = theta0 + sum_t w_t * lambda_t * M_t * S_t, read straight from the packed bits: the extra
memory is the merged copy plus at most a bounded scratch, never T dense task vectors. Tensors that
no switch touches are not copied: the result shares them with the base.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import fused
from .packing import ternary
from .types import Switch

Weighted = Sequence[tuple[Switch, float]]


def switch_delta(sw: Switch, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The dense tau_hat of one tensor (lambda * M * S, or the exact 0-dim delta), or None."""
    if name in sw.dense:
        return sw.dense[name].to(dtype)
    e = sw.entry_map().get(name)
    if e is None:
        return None
    bits = ternary(sw.mask[e.offset:e.offset + e.nbytes], sw.pos[e.offset:e.offset + e.nbytes], e.numel, dtype)
    return (bits * e.scale).reshape(e.shape)


CHUNK = 1 << 24  # elements decoded at once: bounds the int8 scratch to 16 MiB


def _contributes(e) -> bool:
    """Whether a tensor entry adds anything (a zero scale or no kept entry adds nothing)."""
    return e.scale != 0.0 and e.kept != 0


def _decoded(sw: Switch):
    """Yield (entry, int8 ternary view) for every tensor of ``sw``, decoding runs of consecutive
    tensors in one pass: per-tensor dispatch, not arithmetic, dominates small towers."""
    run: list = []
    size = 0

    def flush():
        first, last = run[0], run[-1]
        lo, hi = first.offset, last.offset + last.nbytes
        tern = ternary(sw.mask[lo:hi], sw.pos[lo:hi], (hi - lo) * 8, torch.int8)
        for e in run:
            start = (e.offset - lo) * 8
            yield e, tern[start:start + e.numel]

    for e in sw.entries:
        if not _contributes(e):
            continue
        bits = e.nbytes * 8  # what the tensor's byte-aligned segment decodes to
        if run and size + bits > CHUNK:
            yield from flush()
            run, size = [], 0
        run.append(e)
        size += bits
    if run:
        yield from flush()


def merged_params(base: dict[str, torch.Tensor], weighted: Weighted, *, kernel: bool = True) -> dict[str, torch.Tensor]:
    """Merged parameters for ``weighted`` = [(switch, weight), ...] over ``base`` (never modified).

    Terms are added switch by switch in fp32, one rounding each, and cast once to each base
    tensor's dtype, so fp16/bf16 backbones keep small deltas. fp32 CPU towers take the fused
    single-pass kernel (fused.py); anything else runs as torch ops, switch by switch, each decoded
    in a few large passes, with at most CHUNK bytes of decoded bits beside the merged copy. Both
    give the same bits; ``kernel=False`` forces torch ops (for comparisons).
    """
    weighted = [(sw, float(w)) for sw, w in weighted if float(w) != 0.0]
    acc = None
    if kernel:
        try:
            acc = _fused_sums(base, weighted)
        except fused.Unsupported:
            pass
    if acc is None:
        acc = _torch_sums(base, weighted)
    for sw, w in weighted:
        for name, d in sw.dense.items():
            if name in base:
                _add(acc, base, name, d.to(base[name].device, torch.float32).reshape(-1), w)
    out = {}
    for name, t in base.items():
        a = acc.get(name)
        if a is not None and (a.shape != t.shape or a.dtype != t.dtype):
            a = a.reshape(t.shape).to(t.dtype)
        out[name] = t if a is None else a
    return out


def _add(acc: dict[str, torch.Tensor], base: dict[str, torch.Tensor], name: str, delta: torch.Tensor,
         coef: float) -> None:
    """acc[name] += coef * delta, the first term writing base + coef * delta without a clone."""
    if name in acc:
        acc[name].add_(delta, alpha=coef)
    else:
        flat0 = base[name].reshape(-1)
        acc[name] = torch.add(flat0 if flat0.dtype == torch.float32 else flat0.float(), delta, alpha=coef)


def _torch_sums(base: dict[str, torch.Tensor], weighted: list[tuple[Switch, float]]) -> dict[str, torch.Tensor]:
    acc: dict[str, torch.Tensor] = {}
    for sw, w in weighted:
        for e, tern in _decoded(sw):
            if e.name in base:
                # one cast then an fp32 add: faster than a mixed-dtype add
                _add(acc, base, e.name, tern.float(), w * e.scale)
    return acc


def _fused_sums(base: dict[str, torch.Tensor], weighted: list[tuple[Switch, float]]) -> dict[str, torch.Tensor]:
    names: list[str] = []
    index: dict[str, int] = {}
    terms = []
    for sw, w in weighted:
        idx, offset, coef = [], [], []
        for e in sw.entries:
            if not _contributes(e) or e.name not in base:
                continue
            i = index.get(e.name)
            if i is None:
                i = index[e.name] = len(names)
                names.append(e.name)
            idx.append(i)
            offset.append(e.offset)
            coef.append(w * e.scale)
        terms.append(fused.Term(sw.mask, sw.pos, np.asarray(idx, dtype=np.int64),
                                np.asarray(offset, dtype=np.int64), np.asarray(coef, dtype=np.float32)))
    if not names:
        return {}
    return dict(zip(names, fused.merge([base[n] for n in names], terms)))


def owned_bytes(params: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> int:
    """Bytes of ``params`` not shared with ``base`` (what a cache entry really costs)."""
    shared = {t.data_ptr() for t in base.values()}
    return sum(t.numel() * t.element_size() for t in params.values() if t.data_ptr() not in shared)


def dense_task_vector(sw: Switch, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tau_hat of a switch as dense fp32 tensors over ``base``'s names (for tests and evaluation)."""
    out = {}
    for name, t in base.items():
        d = switch_delta(sw, name)
        out[name] = torch.zeros_like(t, dtype=torch.float32) if d is None else d.to(t.device)
    return out
