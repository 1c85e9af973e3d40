"""One forward pass for a batch whose rows need different merged weights.

Every parameterised operation of the supported towers is affine in its own parameters given its
input (linear, convolution, the affine part of layer and batch norm, added embeddings, layer scale,
the final projection), so a row served with theta0 + sum_t w_t tau_t never needs a tower of its own.
Rows are sorted so that rows sharing weights (a *group*) are a contiguous slice of the batch; the
batch then runs through the tower once: every parameter-free operation (activations, attention,
softmax, pooling, residual adds) on all rows together, and each parameterised operation per group,
with that group's tensors. Norms and embeddings take per-row parameters in one op. In a convolution
tower the groups' activations stay apart from one convolution to the next (parts.py), so the
activations and residual adds between them run per group too, and the batch is joined before the
first other module. Modules that fuse an activation after the affine part (timm's BatchNormAct2d)
are split, so that the mixing happens before the non-linearity; attention runs its in- and
out-projections per group and the attention itself on the whole batch.

Where each group's tensors come from is the caller's business (``Groups.fetch``): a cached merged
tower for a hot combination, or tensors merged just in time (see jit.py). In a tower with no norm
folded into a convolution (ViTs, ConvNeXt), a request may also run as copies, one in the group of
each switch it mixes, whose outputs are mixed after every operation (mixed_ops.Copies): a mix then
needs no merged weights of its own (``MixedTower.decomposable``, checked on the probe batch).

:func:`build` returns None for a tower it cannot run this way (the engine then falls back to one
forward per group); it checks that every parameter is read by one of the mixed operations and that
a probe batch gives the plain forward's answer.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from . import mixed_timm
from .mixed_ops import (Copies, Groups, MixedBatchNorm, MixedConv, MixedViT, Names, _Active, _mixed_module, _Op,
                        fold)
from .parts import Parts, whole

__all__ = ["Copies", "Groups", "MixedTower", "build"]

log = logging.getLogger(__name__)


class MixedTower:
    """The backbone's tower rebuilt with mixed operations (base tensors shared, never copied)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]):
        self.active = _Active({})
        memo = {id(t): t for t in (*params.values(), *buffers.values())}
        root = copy.deepcopy(model, memo)
        covered: set[str] = set()
        for name, mod in list(root.named_modules()):
            if not name:
                continue
            mixed = _mixed_module(self.active, name + ".", mod)
            if mixed is None:
                continue
            parent, _, leaf = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, leaf, mixed)
            covered.update(_names(mixed))
        covered.update(mixed_timm.adapt(self.active, root))
        top = model
        if type(top).__name__ == "VisionTransformer" and type(top).__module__.startswith("open_clip"):
            root = MixedViT(self.active, root)
            covered.update(("class_embedding", "positional_embedding", "proj"))
        self.module = root.eval()
        self.missing = sorted(set(params) - covered)
        self.order: list[Names] = []  # parameter names in the order the forward reads them
        self._joins: list = []  # hooks that join Parts before other modules (see set_parts)
        # whether a request may run as copies mixed after every operation (mixed_ops.Copies): no
        # folded norm, and the probe batch answered so (set by build)
        self.decomposable = False

    def __call__(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        self.active.groups = groups
        try:
            with torch.inference_mode():
                return whole(self.module(x))
        finally:
            self.active.groups = None

    @property
    def parts(self) -> bool:
        return self.active.parts

    def set_parts(self, on: bool) -> None:
        """Have convolutions hand on per-group Parts (parts.py); every module that is not a mixed
        operation, a container or an identity then joins them before it runs."""
        for h in self._joins:
            h.remove()
        self._joins = []
        self.active.settings["parts"] = on
        if not on:
            return

        def join(mod, args):
            if any(isinstance(a, Parts) for a in args):
                return tuple(whole(a) for a in args)
            return None

        for mod in self.module.modules():
            if isinstance(mod, _Op) or isinstance(mod, nn.Identity) or next(mod.children(), None) is not None:
                continue
            self._joins.append(mod.register_forward_pre_hook(join))

    def trace(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        """A forward that records the order in which operations read their parameters, and which
        convolutions feed a BatchNorm directly (candidates for folding)."""
        self.active.record = []
        outputs: dict[int, tuple[MixedConv, torch.Tensor]] = {}
        self.pairs: list[tuple[MixedConv, MixedBatchNorm]] = []

        def after_conv(mod, args, out):
            outputs[id(out)] = (mod, out)  # the tensor is kept, so its id is not reused

        def before_bn(mod, args):
            hit = outputs.get(id(args[0]))
            if hit is not None and hit[1] is args[0]:
                self.pairs.append((hit[0], mod))

        hooks = [m.register_forward_hook(after_conv) for m in self.module.modules() if isinstance(m, MixedConv)]
        hooks += [m.register_forward_pre_hook(before_bn) for m in self.module.modules() if isinstance(m, MixedBatchNorm)]
        try:
            return self(x, groups)
        finally:
            for h in hooks:
                h.remove()
            self.order = list(dict.fromkeys(self.active.record))
            self.active.record = None

    def merge_order(self) -> list[Names]:
        """The operations in the order the forward reads them, as the just-in-time merge takes
        them (jit.py): a folded convolution and its norm as one, since the fold reads both at
        once and a merge of the norm's tensors into a segment of their own would overwrite the
        convolution's."""
        norm_of = {conv.names: bn.names for conv, bn in self.pairs if conv.bn is bn}
        folded = set(norm_of.values())
        return [names + norm_of.get(names, ()) for names in self.order if names not in folded]

    def set_folding(self, on: bool) -> None:
        for conv, bn in self.pairs:
            conv.bn = bn if on else None
            conv.act = None

    def set_fused_act(self, on: bool) -> None:
        """Run the folded norms' activations inside the convolutions (oneDNN, fp32 CPU only)."""
        for conv, _ in self.pairs:
            conv.act = conv.fused_act() if on and conv.bn is not None else None

    def derived(self, params: dict[str, torch.Tensor]) -> tuple[dict, set[str]]:
        """The folded convolutions of a cached tower's weights (a Groups memo for its group), and
        the names of the tensors they replace, which a cached tower need not keep."""
        memo, replaced = {}, set()
        for conv, bn in self.pairs:
            if conv.bn is bn:
                w, b = (params[n] if n else None for n in conv.names)
                gamma, beta = (params[n] for n in bn.names)
                memo[id(conv)] = conv.prepare(*fold(w, b, gamma, beta, bn.mean, bn.inv))
                replaced.update(n for n in (*conv.names, *bn.names) if n)
        return memo, replaced


def _names(mod: nn.Module) -> set[str]:
    out = set()
    for m in mod.modules():
        if isinstance(m, _Op):
            out.update(n for n in m.names if n)
            out.update(n for n in getattr(m, "out_names", ()) if n)
    return out


def build(model: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
          probe: torch.Tensor) -> tuple[MixedTower | None, str]:
    """The mixed tower of ``model``, or (None, reason) when it cannot run this tower exactly.

    A probe batch of two rows in two groups (both on the base weights, so the shortcut for equal
    tensors is bypassed) must give the plain forward's embeddings; the forward also records the
    order in which parameters are read, which the just-in-time merge follows.
    """
    try:
        tower = MixedTower(model, params, buffers)
    except Exception as exc:  # a module that deepcopy or the checks do not expect
        return None, f"cannot rebuild the tower: {exc}"
    if tower.missing:
        shown = ", ".join(tower.missing[:3])
        return None, f"no mixed operation reads {len(tower.missing)} parameters ({shown}{', ...' if len(tower.missing) > 3 else ''})"
    x = probe.expand(2, *probe.shape[1:]).clone()
    x[1] = x[1].flip(-1)
    distinct = {}

    def fetch(g, names):
        # group 1 gets equal but distinct tensors, so that every operation takes its per-group path
        if g == 0:
            return tuple(params[n] if n else None for n in names)
        return tuple(distinct.setdefault(n, params[n].clone()) if n else None for n in names)

    groups = Groups([(0, 1), (1, 2)], fetch, probe.device)

    tol = 1e-4 if probe.dtype == torch.float32 else 2e-2  # fp16/bf16 round at about 1e-3 per operation

    def same(got):
        return _close(got, want, tol)

    try:
        with torch.inference_mode():
            want = model(x)
        if not same(tower.trace(x, groups)):
            return None, "the mixed forward does not reproduce the plain forward on a probe batch"
        tower.set_folding(True)
        if not same(tower(x, groups)):  # a convolution output used beyond its norm: do not fold
            tower.set_folding(False)
        else:
            tower.set_fused_act(True)
            if not same(tower(x, groups)):
                tower.set_fused_act(False)
        if not isinstance(tower.module, MixedViT):  # a ViT joins its rows after the first layer
            tower.set_parts(True)
            try:
                kept = same(tower(x, groups))
            except Exception:  # an operation between convolutions that needs the batch whole
                kept = False
            if not kept:
                tower.set_parts(False)
    except Exception as exc:
        return None, f"the mixed forward failed on a probe batch: {type(exc).__name__}: {exc}"
    if set(n for names in tower.order for n in names if n) != set(params):
        return None, "the probe forward did not read every parameter"
    if not any(conv.bn is bn for conv, bn in tower.pairs):
        try:
            tower.decomposable = _copies_answer(model, tower, x, params, buffers, tol)
        except Exception:  # an operation that does not take copies: requests run whole
            tower.decomposable = False
    return tower, ""


def _copies_answer(model, tower: MixedTower, x: torch.Tensor, params: dict, buffers: dict, tol: float) -> bool:
    """Whether a request run as copies (one in each of two groups, weights 0.25 and 0.75) gives
    what the merged weights give, beside a request run whole."""
    from torch.func import functional_call
    g = torch.Generator().manual_seed(0)
    other = {n: t + 0.05 * t.abs().mean() * torch.randn(t.shape, generator=g).to(t.device, t.dtype)
             for n, t in params.items()}
    merged = {n: 0.25 * t + 0.75 * other[n] for n, t in params.items()}
    rows = torch.cat([x, x[1:]])  # request 0, then request 1 twice

    def fetch(gi, names):
        src = params if gi == 0 else other
        return tuple(src[n] if n else None for n in names)

    copies = Copies.of([(1, 1, 0.25), (2, 1, 0.75)], x.device)
    got = tower(rows, Groups([(0, 2), (2, 3)], fetch, x.device, copies=copies))
    with torch.inference_mode():
        want = torch.cat([model(x[:1]), functional_call(model, (merged, buffers), (x[1:],), tie_weights=False,
                                                                  strict=False)])
    return got.shape[0] == 3 and _close(got[:2], want, tol) and torch.equal(got[1], got[2])


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    """Whether a probe's answer matches the plain forward's, within ``tol`` of its largest value."""
    return got.shape == want.shape and torch.allclose(
        got.float(), want.float(), rtol=10 * tol, atol=tol * float(want.abs().max()) + 1e-6)
