"""The static merging baselines the paper compares with (docs/method.md), behind one interface.

Each method takes the pretrained parameters and dense task vectors ``{task: {tensor: tau}}`` and
returns, per task, the parameters that task is evaluated with. Static merges return one shared
dict for every task; EMR returns one per task. Only for offline evaluation: they hold every dense
task vector in memory, which the serving path never does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Params = dict[str, torch.Tensor]
TaskVectors = dict[str, Params]
Method = Callable[[Params, TaskVectors], dict[str, Params]]


def _flat(tv: Params) -> torch.Tensor:
    return torch.cat([t.reshape(-1).float() for t in tv.values()])


def _unflat(vec: torch.Tensor, like: Params) -> Params:
    out, i = {}, 0
    for k, t in like.items():
        out[k] = vec[i:i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


def _add(base: Params, delta: Params, scale: float = 1.0) -> Params:
    return {k: (v.float() + scale * delta[k]).to(v.dtype) if k in delta else v for k, v in base.items()}


def _same_for_all(tvs: TaskVectors, params: Params) -> dict[str, Params]:
    return {t: params for t in tvs}


def _keep_top(vec: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the ``fraction`` largest-magnitude entries of ``vec`` (ties at the threshold kept)."""
    k = max(1, int(vec.numel() * fraction))
    threshold = torch.kthvalue(vec.abs(), vec.numel() - k + 1).values
    return vec.abs() >= threshold


def weight_averaging(base: Params, tvs: TaskVectors) -> dict[str, Params]:
    mean = sum(_flat(tv) for tv in tvs.values()) / len(tvs)
    return _same_for_all(tvs, _add(base, _unflat(mean, next(iter(tvs.values())))))


def task_arithmetic(base: Params, tvs: TaskVectors, scale: float = 0.3) -> dict[str, Params]:
    total = sum(_flat(tv) for tv in tvs.values())
    return _same_for_all(tvs, _add(base, _unflat(total, next(iter(tvs.values()))), scale))


def ties(base: Params, tvs: TaskVectors, keep: float = 0.2, scale: float = 0.3) -> dict[str, Params]:
    trimmed = torch.stack([v * _keep_top(v, keep) for v in (_flat(tv) for tv in tvs.values())])
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return _same_for_all(tvs, _add(base, _unflat(merged, next(iter(tvs.values()))), scale))


def dare(base: Params, tvs: TaskVectors, p: float = 0.5, scale: float = 0.3, seed: int = 0) -> dict[str, Params]:
    g = torch.Generator().manual_seed(seed)
    total = None
    for tv in tvs.values():
        v = _flat(tv)
        keep = torch.rand(v.shape, generator=g) >= p
        v = v * keep / (1 - p)
        total = v if total is None else total + v
    return _same_for_all(tvs, _add(base, _unflat(total, next(iter(tvs.values()))), scale))


def emr(base: Params, tvs: TaskVectors) -> dict[str, Params]:
    flats = {t: _flat(tv) for t, tv in tvs.items()}
    stacked = torch.stack(list(flats.values()))
    elected = torch.sign(stacked.sum(0))
    agreeing = stacked * (torch.sign(stacked) == elected)
    unified = elected * agreeing.abs().max(0).values
    like = next(iter(tvs.values()))
    out = {}
    for t, v in flats.items():
        mask = (v * unified) > 0
        denom = (unified * mask).abs().sum()
        rescale = float(v.abs().sum() / denom) if denom > 0 else 0.0
        out[t] = _add(base, _unflat(unified * mask, like), rescale)
    return out


def localize_and_stitch(base: Params, tvs: TaskVectors, keep: float = 0.01) -> dict[str, Params]:
    total, count = None, None
    for tv in tvs.values():
        v = _flat(tv)
        m = _keep_top(v, keep)
        total = v * m if total is None else total + v * m
        count = m.float() if count is None else count + m.float()
    stitched = total / count.clamp(min=1)
    return _same_for_all(tvs, _add(base, _unflat(stitched, next(iter(tvs.values())))))


METHODS: dict[str, Method] = {
    "weight_averaging": weight_averaging,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "emr": emr,
    "localize_and_stitch": localize_and_stitch,
}
