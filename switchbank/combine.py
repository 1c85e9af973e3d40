"""Materialising merged image-tower parameters from weighted switches.

theta = theta0 + sum_t w_t * lambda_t * M_t * S_t, computed tensor by tensor: the extra memory at
any moment is the merged copy being built plus one decoded tensor, never T dense task vectors.
Tensors that no switch touches are not copied: the result shares them with the base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import Incompatible
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


def check_against(sw: Switch, base: dict[str, torch.Tensor]) -> None:
    """Raise Incompatible unless every tensor of the switch exists in ``base`` with its shape."""
    for e in sw.entries:
        t = base.get(e.name)
        if t is None:
            raise Incompatible(f"switch {sw.name!r} has tensor {e.name!r}, which the backbone lacks")
        if tuple(t.shape) != e.shape:
            raise Incompatible(f"switch {sw.name!r} tensor {e.name!r} has shape {e.shape}, backbone {tuple(t.shape)}")
    for name, v in sw.dense.items():
        if name not in base or base[name].shape != v.shape:
            raise Incompatible(f"switch {sw.name!r} has 0-dim tensor {name!r}, which the backbone lacks")


def merged_params(base: dict[str, torch.Tensor], weighted: Weighted) -> dict[str, torch.Tensor]:
    """Merged parameters for ``weighted`` = [(switch, weight), ...] over ``base`` (never modified).

    The first switch's add writes the output directly instead of cloning the base first. Sums run
    in fp32 and are cast once to each base tensor's dtype, so fp16/bf16 backbones keep small deltas.
    """
    weighted = [(sw, float(w)) for sw, w in weighted if float(w) != 0.0]
    maps = [(sw, w, sw.entry_map()) for sw, w in weighted]
    out: dict[str, torch.Tensor] = {}
    for name, theta0 in base.items():
        acc: torch.Tensor | None = None
        flat0 = theta0.reshape(-1)
        for sw, w, entries in maps:
            e = entries.get(name)
            if e is not None:
                if e.scale == 0.0 or e.kept == 0:
                    continue
                # int8 decode then one cast: faster than a float table look-up or a mixed-dtype add
                delta = ternary(sw.mask[e.offset:e.offset + e.nbytes], sw.pos[e.offset:e.offset + e.nbytes],
                                e.numel, torch.int8).float()
                coef = w * e.scale
            elif name in sw.dense:
                delta, coef = sw.dense[name].to(theta0.device, torch.float32).reshape(-1), w
            else:
                continue
            if acc is None:
                acc = torch.add(flat0 if flat0.dtype == torch.float32 else flat0.float(), delta, alpha=coef)
            else:
                acc.add_(delta, alpha=coef)
        out[name] = theta0 if acc is None else acc.reshape(theta0.shape).to(theta0.dtype)
    return out


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
