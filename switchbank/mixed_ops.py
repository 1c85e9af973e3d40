"""The operations of the mixed forward (mixed.py): each parameterised operation of a tower, run
per group of rows on that group's tensors, which it reads from the active Groups.

Linears write each group's rows into one output, and so do convolutions, unless the tower keeps the
groups apart (parts.py): then they hand on one tensor per group, which the next convolution or norm
takes as it is. Norms, layer scales and embeddings take per-row parameters in one operation; a
convolution whose output feeds a BatchNorm and nothing else gets the norm's affine part folded into
each group's weights (exact up to rounding), which saves a pass over the activations; attention
runs its projections per group and the attention itself on the whole batch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fused, onednn
from .onednn import NO_ACT, dense, linear
from .parts import Parts, per_piece, pieces_of, whole

Names = tuple  # parameter names of one operation, None for an absent bias


@dataclass
class Copies:
    """Requests that run as several rows of the batch, one in the group of each switch they mix
    (and one on the base weights for what their weights leave to it), with that switch's weight.

    Every parameterised operation is affine in its parameters given its input, so with the
    weights summing to 1 a request's output is the weighted sum of its copies' outputs. After
    every such operation (:meth:`mix`) each copy gets that sum, so all copies enter the next
    operation, and every non-linearity, alike. Only towers with no norm folded into a convolution
    run this way: a folded norm scales the convolution's output by its own parameters (see
    MixedTower.decomposable).
    """

    pos: torch.Tensor  # the rows of the batch that are copies
    # [copies, copies]: row i of it holds, at each copy j of the same request, j's weight (else 0),
    # so that its product with the copies' outputs gives every copy its request's sum
    mixing: torch.Tensor
    # for the CPU kernel: the copies' rows grouped by request, where each group starts, the weights
    grouped: tuple | None = None

    @classmethod
    def of(cls, rows: list[tuple[int, int, float]], device) -> Copies | None:
        """From (row of the batch, request, weight) for every copy; None if there are none."""
        if not rows:
            return None
        req = torch.tensor([r for _, r, _ in rows])
        w = torch.tensor([w for _, _, w in rows], dtype=torch.float64)
        mixing = torch.where(req[:, None] == req[None, :], w[None, :], 0.0)
        by_req = sorted(rows, key=lambda r: r[1])
        reqs = [r for _, r, _ in by_req]
        start = [0] + [i for i in range(1, len(reqs)) if reqs[i] != reqs[i - 1]] + [len(reqs)]
        grouped = (np.array([p for p, _, _ in by_req], np.int64), np.array(start, np.int64),
                   np.array([w for _, _, w in by_req], np.float32))
        return cls(torch.tensor([p for p, _, _ in rows], device=device), mixing.to(device), grouped)

    def mix(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` (batch first) with every copy's rows replaced by its request's weighted sum, in
        place. float32 on the CPU: one pass of numba's kernel over the copies' rows, reading each
        once and writing each once (merge_kernel.mix): on ViT-B-32's activations, 4 against 24 ms for
        a batch's 48 mixes in isolation. Elsewhere one gather, one product over the copies, one
        scatter (the copies' activations are large: a ViT-B-32 MLP's output is 600 KB a row)."""
        if (self.grouped is not None and out.dtype == torch.float32 and out.device.type == "cpu"
                and out.is_contiguous() and fused.AVAILABLE):
            try:
                kernel = fused.kernel()
            except fused.Unsupported:
                pass
            else:
                kernel.mix(out.detach().view(out.shape[0], -1).numpy(), *self.grouped)
                return out
        acc = torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else out.dtype  # sum in fp32
        sub = out.index_select(0, self.pos).reshape(self.pos.shape[0], -1).to(acc)
        mixed = torch.mm(self.mixing.to(acc), sub).to(out.dtype)
        out.index_copy_(0, self.pos, mixed.view(-1, *out.shape[1:]))
        return out


@dataclass
class Groups:
    """The row layout of one mixed forward.

    ``spans`` are the (start, end) row ranges of the groups, in order, covering the batch;
    ``fetch(g, names)`` returns group g's tensors for ``names`` (None for a None name);
    ``copies``, the rows whose outputs are mixed after every operation (see Copies).
    """

    spans: list[tuple[int, int]]
    fetch: Callable[[int, Names], tuple]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # per group, tensors derived from its weights (folded convolutions), kept as long as the
    # caller keeps the dict: across batches for a cached tower, for one batch otherwise
    memo: list[dict] | None = None
    copies: Copies | None = None
    _index: torch.Tensor | None = None

    def __post_init__(self):
        if self.memo is None:
            self.memo = [{} for _ in self.spans]

    @property
    def index(self) -> torch.Tensor:
        """The group of each row, for per-row gathers."""
        if self._index is None:
            sizes = torch.tensor([e - s for s, e in self.spans])
            self._index = torch.repeat_interleave(torch.arange(len(self.spans)), sizes).to(self.device)
        return self._index

    def tensors(self, names: Names) -> list[tuple]:
        """Each group's tensors for ``names``; a single entry when every group has the same ones,
        so that the operation runs once on the whole batch."""
        out = [self.fetch(g, names) for g in range(len(self.spans))]
        first = out[0]
        if all(all(a is b for a, b in zip(o, first)) for o in out[1:]):
            return [first]
        return out

    def mix(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` with the copies' rows mixed (see Copies), where there are copies."""
        return out if self.copies is None else self.copies.mix(out)

    def rows(self, values: list[torch.Tensor], ndim: int) -> torch.Tensor:
        """Per-row copies of per-group ``values`` ([D...] each), shaped [B, 1, ..., D...] for
        broadcasting against an activation of ``ndim`` dimensions; a request with copies gets its
        mix (every per-row parameter is used affinely: scaled or added)."""
        stacked = self.mix(torch.stack(values).index_select(0, self.index))
        extra = ndim - stacked.dim()
        return stacked.reshape(stacked.shape[:1] + (1,) * extra + stacked.shape[1:])


class _Active(threading.local):
    """What the forward running on this thread reads (its Groups, a trace's record), and the
    tower's settings, the same on every thread."""

    groups: Groups | None = None
    record: list | None = None

    def __init__(self, settings: dict):
        self.settings = settings  # run again on each thread, with the same dict

    @property
    def parts(self) -> bool:
        """Whether convolutions hand on Parts (parts.py) rather than a joined batch."""
        return self.settings.get("parts", False)


class _Op(nn.Module):
    """A parameterised operation that reads its tensors from the active Groups."""

    def __init__(self, active: _Active, names: Names):
        super().__init__()
        self.active = active
        self.names = names

    def tensors(self) -> tuple[Groups, list[tuple]]:
        g = self.active.groups
        if self.active.record is not None:
            self.active.record.append(self.names)
        return g, g.tensors(self.names)


def _per_group(groups: Groups, ts: list[tuple], x, fn, apart: bool = False):
    """fn(rows, *tensors) per group on its slice of ``x`` (batch first), joined back in order; with
    ``apart``, or for an ``x`` that is already Parts, left as Parts (joined where copies are mixed)."""
    split = isinstance(x, Parts)
    if len(ts) == 1 and not split:
        return fn(x, *ts[0])
    pieces = pieces_of(x, groups.spans)
    out = [fn(p, *t) for p, t in zip(pieces, per_piece(ts, len(pieces)))]
    if groups.copies is not None:
        return groups.mix(torch.cat(out))
    return Parts(out) if apart or split else torch.cat(out)


UNFOLD = 2  # a cold group runs its norm on the output where UNFOLD * output < weight (MixedBatchNorm.fold)


def _linear_rows(groups: Groups, ts: list[tuple], x: torch.Tensor, act: tuple = NO_ACT, finish=None) -> torch.Tensor:
    """A linear map per group over ``x`` [B, ..., in] (batch first), each group's rows written into
    its slice of one output. A group's entry (weight, bias, post) has its output [rows, out] passed
    through ``finish(output, post)`` instead of getting ``act``."""
    if len(ts) == 1 and len(ts[0]) == 2:
        return linear(x, *ts[0], act)
    b = x.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    per = x2.shape[0] // b  # rows of x2 per batch row (tokens, pixels)
    out = x2.new_empty((x2.shape[0], ts[0][0].shape[0]))
    for (s, e), (w, bias, *post) in zip(groups.spans, per_piece(ts, len(groups.spans))):
        if post:
            out[s * per:e * per] = finish(linear(x2[s * per:e * per], w, bias), post[0])
        else:
            out[s * per:e * per] = linear(x2[s * per:e * per], w, bias, act)
    return groups.mix(out.view(*x.shape[:-1], out.shape[-1]))


class MixedLinear(_Op):
    def forward(self, x):
        g, ts = self.tensors()
        return _linear_rows(g, ts, whole(x))


class MixedConv(_Op):
    """A 2-D convolution per group.

    Pointwise convolutions of channels_last activations run as per-group matrix products over
    the pixels, each writing its slice of one output. TensorFlow's "same" padding (timm's
    Conv2dSame) pads one more row or column at the end than at the start where the input's size
    asks for it; rather than a padded copy of the input, the convolution then runs with the larger
    padding on both sides and a kernel grown by a zero row or column at its start (see
    :meth:`same_plan`), which gives the same sums. When the trace finds that the output feeds a
    BatchNorm and nothing else, the norm's affine part is folded into each group's weights and bias
    (exact up to rounding), which saves a pass over the activations; a group whose weights were
    merged for this batch only and whose output is smaller than the weight runs the norm on its
    output instead (MixedBatchNorm.fold), which saves writing a folded copy of the weight.
    """

    def __init__(self, active, names, mod: nn.Conv2d, same: bool):
        super().__init__(active, names)
        self.same = same
        self.stride, self.dilation, self.groups = mod.stride, mod.dilation, mod.groups
        self.padding = mod.padding
        self.kernel = tuple(mod.kernel_size)
        self.weight_shape = tuple(mod.weight.shape)
        self.plain = mod._conv_forward
        self.pointwise = (not same and self.kernel == (1, 1) and tuple(self.stride) == (1, 1) and self.groups == 1
                          and tuple(self.padding) == (0, 0) and mod.padding_mode == "zeros")
        self.bn: MixedBatchNorm | None = None
        # the activation of the folded norm, run by oneDNN on the convolution's output as it is
        # written (a oneDNN post-op), which saves a pass over the activations; set by the tower
        # when the norm's activation is one oneDNN computes exactly (see set_fused_act)
        self.act: tuple | None = None
        self.in_shape: list[int] | None = None  # of the last input as run (a padded copy where made): for prepare
        self._pad: dict = {}
        self._plans: dict = {}

    def fused_act(self) -> tuple | None:
        """The oneDNN post-op for the folded norm's activation, or None where it has none."""
        act = None if self.bn is None or not isinstance(self.bn.drop, nn.Identity) else self.bn.act
        if isinstance(act, nn.ReLU):
            return ("relu", [])
        if isinstance(act, nn.Hardtanh):  # ReLU6 too
            return ("hardtanh", [float(act.min_val), float(act.max_val)])
        return None

    def same_plan(self, size) -> tuple | None:
        """For "same" padding of an input of spatial ``size``: (padding, grow), the symmetric
        padding and the zero rows and columns to put before the kernel that give TensorFlow's
        padding without a padded copy, or None where that does not hold (dilated kernels).

        TensorFlow pads (total // 2, total - total // 2): at most one more at the end. With one
        more, output i of a kernel grown by a leading zero, padded by the larger amount on both
        sides, reads input s * i + j - end + 1 for tap j >= 1, which is what the original tap j - 1
        reads with the smaller padding at the start; the grown kernel's extra tap reads padding or
        input, times zero, and the output sizes are equal."""
        size = tuple(size)
        plan = self._plans.get(size, False)
        if plan is False:
            plan = None
            if tuple(self.dilation) == (1, 1):
                pads = same_pads(size, self.kernel, self.stride, self.dilation)
                plan = (tuple(end for _, end in pads), tuple(end - start for start, end in pads))
            self._plans[size] = plan
        return plan

    def kernel_for(self, w: torch.Tensor, grow: tuple, packed: bool) -> torch.Tensor:
        """``w`` (as stored: plain, grown, or reordered by prepare) as a plain weight grown by
        ``grow``, or as it is where it is a reordered weight of that shape and ``packed``."""
        shape = tuple(k + g for k, g in zip(self.kernel, grow))
        if w.is_mkldnn:
            if packed and tuple(w.shape[-2:]) == shape:
                return w
            w = w.to_dense()
        have = tuple(n - k for n, k in zip(w.shape[-2:], self.kernel))
        if have == tuple(grow):
            return w
        if any(have):
            w = w[..., have[0]:, have[1]:]
        return F.pad(w, (grow[1], 0, grow[0], 0)) if any(grow) else w

    def prepare(self, w: torch.Tensor, b: torch.Tensor | None) -> tuple:
        """A cached tower's folded (weight, bias) as this convolution runs it: where it runs on
        oneDNN (fp32 CPU), the weight reordered once into oneDNN's layout, which the kernel would
        otherwise redo on every call, in every batch; :func:`dense` turns it back for other paths.
        A batch's own folds (weights merged just in time) are used once and stay as they are:
        reordering them ahead costs more than the kernel's own reorder (measured)."""
        if onednn.PACK_CONV is None or self.in_shape is None or w.device.type != "cpu" or w.dtype != torch.float32:
            return w, b
        if self.pointwise:
            n, _, h, wd = self.in_shape
            return onednn.PACK_LINEAR(w.reshape(w.shape[0], -1), n * h * wd), b
        if self.act is None:  # runs on F.conv2d, which takes torch's layout only
            return w, b
        padding = list(self.padding)
        if self.same:
            plan = self.same_plan(self.in_shape[-2:])
            padding = [0, 0] if plan is None else list(plan[0])
            if plan is not None:
                w = self.kernel_for(w, plan[1], False)
        return onednn.PACK_CONV(w, padding, list(self.stride), list(self.dilation), self.groups, self.in_shape), b

    def out_numel(self, size) -> int:
        """Elements of one row's output for an input of spatial ``size``."""
        if self.same or self.padding == "same":
            hw = [-(-n // s) for n, s in zip(size, self.stride)]
        elif isinstance(self.padding, str):  # "valid"
            hw = [(n - d * (k - 1) - 1) // s + 1 for n, d, k, s in zip(size, self.dilation, self.kernel, self.stride)]
        else:
            hw = [(n + 2 * p - d * (k - 1) - 1) // s + 1
                  for n, p, d, k, s in zip(size, self.padding, self.dilation, self.kernel, self.stride)]
        return self.weight_shape[0] * hw[0] * hw[1]

    def finish(self, out: torch.Tensor, post: tuple, act: tuple | None) -> torch.Tensor:
        """A group's output of its unfolded weights (see MixedBatchNorm.fold) through its norm
        (``post``: gamma, beta; channels on dimension 1), and the norm's activation where
        ``act`` says the folded groups got it inside the convolution."""
        gamma, beta = post
        out = F.batch_norm(out, self.bn.mean, self.bn.var, gamma, beta, False, 0.0, self.bn.eps)
        return out if act is None else self.bn.act(out)

    def forward(self, x):
        split = isinstance(x, Parts)
        first = x.pieces[0] if split else x
        if self.bn is not None:
            g, ts = self.active.groups, self.bn.fold(self, self.out_numel(first.shape[-2:]))
        else:
            g, ts = self.tensors()
        apart = split or (self.active.parts and len(ts) > 1)
        channels_last = first.is_contiguous(memory_format=torch.channels_last)
        act = self.act if self.act is not None and onednn.takes(first, ts[0][0]) else None
        pointwise = self.pointwise and all(p.is_contiguous(memory_format=torch.channels_last)
                                           for p in (x.pieces if split else (x,)))
        if act is not None and (pointwise and onednn.LINEAR is not None or not pointwise and onednn.CONV is not None):
            self.bn.act_done = True
        else:
            act = None
        if pointwise:
            self.in_shape = _batch_shape(x)
            if apart:
                def run(p, w, b, *post):
                    out = linear(p.permute(0, 2, 3, 1), w, b, NO_ACT if post else act or NO_ACT).permute(0, 3, 1, 2)
                    return self.finish(out, post[0], act) if post else out
                return _per_group(g, ts, x, run, apart=True)
            return _linear_rows(g, ts, x.permute(0, 2, 3, 1), act or NO_ACT,
                                lambda out, post: self.finish(out, post, act)).permute(0, 3, 1, 2)
        padding = self.padding
        if self.same:
            plan = self.same_plan(first.shape[-2:])
            if plan is None:  # a padded copy of the input
                if split:  # a buffer kept per shape would be remade for every group size: none kept
                    x = x.map(lambda p: pad_same(p, self.kernel, self.stride, self.dilation))
                else:
                    x = pad_same(x, self.kernel, self.stride, self.dilation, self._pad)
            padding, grow = plan or ((0, 0), (0, 0))
            ts = [(self.kernel_for(w, grow, act is not None), b, *post) for w, b, *post in ts]
            if act is None and len(ts) == 1 and len(ts[0]) == 2 and not split:
                return F.conv2d(x, *ts[0], self.stride, padding, self.dilation, self.groups)
        else:
            if act is None or self.pointwise:  # not the path prepare() reordered the weights for
                ts = [(dense(w, self.weight_shape), b, *post) for w, b, *post in ts]
            if act is None and len(ts) == 1 and len(ts[0]) == 2 and not split:
                return self.plain(x, *ts[0])
        self.in_shape = _batch_shape(x)
        if act is not None:
            stride, dilation = list(self.stride), list(self.dilation)

            def conv(xs, w, b, *post):
                if post:
                    return self.finish(onednn.CONV(xs, w, b, list(padding), stride, dilation, self.groups, "none", [], ""),
                                       post[0], act)
                return onednn.CONV(xs, w, b, list(padding), stride, dilation, self.groups, act[0], act[1], "")
        else:
            def conv(xs, w, b, *post):
                out = F.conv2d(xs, w, b, self.stride, padding, self.dilation, self.groups)
                return self.finish(out, post[0], None) if post else out
        out = _per_group(g, ts, x, conv, apart)
        if not channels_last:
            return out
        if isinstance(out, Parts):
            return out.map(lambda p: p.contiguous(memory_format=torch.channels_last))
        return out.contiguous(memory_format=torch.channels_last)


def _batch_shape(x) -> list[int]:
    """The shape of ``x`` as one batch (a Parts' rows counted together)."""
    if isinstance(x, Parts):
        return [sum(p.shape[0] for p in x.pieces), *x.pieces[0].shape[1:]]
    return list(x.shape)


PAD_KEEP_BYTES = 64 << 20  # padded buffers up to this size are kept between calls


def same_pads(size, kernel, stride, dilation) -> list[tuple[int, int]]:
    """TensorFlow's "SAME" padding (start, end) of each spatial dimension of an input of ``size``."""
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def pad_same(x: torch.Tensor, kernel, stride, dilation, keep: dict | None = None) -> torch.Tensor:
    """TensorFlow's "SAME" padding, as timm's Conv2dSame applies it, with one copy of ``x``.

    F.pad zeroes a fresh output and then copies the interior. Here only the border of a fresh
    buffer is zeroed, and the buffer of the last shape is kept in ``keep`` (the caller's, used by
    one forward at a time): its border is zero from the first call on, so each later call only
    copies the interior.
    """
    (t, b), (left, r) = same_pads(x.shape[-2:], kernel, stride, dilation)
    if not (t or b or left or r):
        return x
    n, c, h, w = x.shape
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    shape = (n, c, h + t + b, w + left + r)
    key = (shape, x.dtype, x.device, fmt)
    out = keep.get(key) if keep is not None else None
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        out[:, :, :t].zero_()
        out[:, :, t + h:].zero_()
        out[:, :, :, :left].zero_()
        out[:, :, :, left + w:].zero_()
        if keep is not None:
            keep.clear()
            if out.numel() * out.element_size() <= PAD_KEEP_BYTES:
                keep[key] = out
    out[:, :, t:t + h, left:left + w] = x
    return out


class MixedBatchNorm(_Op):
    """Inference BatchNorm2d (running statistics) with per-row affine parameters, then the
    activation and dropout of timm's BatchNormAct2d, after the mixing."""

    def __init__(self, active, names, mod: nn.BatchNorm2d):
        super().__init__(active, names)
        self.eps = mod.eps
        self.register_buffer("mean", mod.running_mean, persistent=False)
        self.register_buffer("var", mod.running_var, persistent=False)
        self.register_buffer("inv", torch.rsqrt(mod.running_var + mod.eps), persistent=False)
        self.drop = getattr(mod, "drop", nn.Identity())
        self.act = getattr(mod, "act", nn.Identity())
        self.folded = False  # set by the convolution that applied this norm's affine part
        self.act_done = False  # set by the convolution that also applied this norm's activation

    def _affine(self, ts: list[tuple]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        scale = [t[0] * self.inv for t in ts]
        return scale, [t[1] - self.mean * s for t, s in zip(ts, scale)]

    def fold(self, conv: MixedConv, out_numel: int | None = None) -> list[tuple]:
        """Per group, ``conv``'s (weight, bias) with this norm's affine part folded in: from the
        group's memo (a cached tower's are computed when it is built), else computed now; or,
        for a group whose output (``out_numel`` elements a row) is smaller than the weight, the
        unfolded (weight, bias, (gamma, beta)), the norm to be run on the output
        (MixedConv.finish). A fold writes a new weight, once per batch for weights merged just in
        time: at the demo tower's last stages a row's output is a few thousand elements where a
        weight is up to 400,000."""
        g = self.active.groups
        if self.active.record is not None:
            self.active.record.extend((conv.names, self.names))
        key = id(conv)
        out = []
        for i, memo in enumerate(g.memo):
            hit = memo.get(key)
            if hit is None:
                w, b = g.fetch(i, conv.names)
                gamma, beta = g.fetch(i, self.names)
                s, e = g.spans[i]
                if out_numel is not None and UNFOLD * (e - s) * out_numel < w.numel():
                    out.append((w, b, (gamma, beta)))
                    continue
                hit = memo[key] = fold(w, b, gamma, beta, self.mean, self.inv)
            out.append(hit)
        self.folded = True
        return out

    def forward(self, x):
        if self.act_done:
            self.folded = self.act_done = False
            return x
        if self.folded:
            self.folded = False
        else:
            g, ts = self.tensors()
            if isinstance(x, Parts):
                x = _per_group(g, ts, x, lambda p, w, b: F.batch_norm(p, self.mean, self.var, w, b, False, 0.0,
                                                                      self.eps))
            elif len(ts) == 1:
                w, b = ts[0]
                x = F.batch_norm(x, self.mean, self.var, w, b, False, 0.0, self.eps)
            elif x.is_contiguous(memory_format=torch.channels_last):
                # per-channel values along the innermost (channel) dimension: a plain stream
                scale, shift = self._affine(ts)
                xs = x.permute(0, 2, 3, 1)
                x = torch.addcmul(g.rows(shift, 4), xs, g.rows(scale, 4)).permute(0, 3, 1, 2)
            else:
                scale, shift = self._affine(ts)
                x = torch.addcmul(g.rows(shift, 2)[..., None, None], x, g.rows(scale, 2)[..., None, None])
        if isinstance(x, Parts):
            return x.map(lambda p: self.act(self.drop(p)))
        return self.act(self.drop(x))


def fold(w, b, gamma, beta, mean, inv) -> tuple[torch.Tensor, torch.Tensor]:
    """conv(x, w, b) followed by inference BatchNorm as one convolution's (weight, bias)."""
    scale = gamma * inv
    shift = beta - mean * scale
    return w * scale.view(-1, *([1] * (w.dim() - 1))), shift if b is None else torch.addcmul(shift, b, scale)


class MixedLayerNorm(_Op):
    """LayerNorm with per-row weight and bias: normalise all rows at once, then apply each row's
    affine part. ``fp32`` follows open_clip's LayerNormFp32 (normalise in fp32, cast back);
    ``channels_first``, timm's LayerNorm2d (over the channels of an NCHW tensor)."""

    def __init__(self, active, names, shape, eps, fp32: bool, channels_first: bool = False):
        super().__init__(active, names)
        self.shape, self.eps, self.fp32, self.channels_first = tuple(shape), eps, fp32, channels_first

    def forward(self, x):
        if self.channels_first:
            return self._norm(whole(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self._norm(whole(x))

    def _norm(self, x):
        g, ts = self.tensors()
        dtype = x.dtype
        xin = x.float() if self.fp32 else x
        if len(ts) == 1:
            w, b = ts[0]
            return F.layer_norm(xin, self.shape, w, b, self.eps).to(dtype)
        y = F.layer_norm(xin, self.shape, None, None, self.eps)
        w = g.rows([t[0] for t in ts], y.dim())
        if ts[0][1] is None:
            return (y * w).to(dtype)
        return torch.addcmul(g.rows([t[1] for t in ts], y.dim()), y, w).to(dtype)


class MixedLayerScale(_Op):
    def forward(self, x):
        g, ts = self.tensors()
        x = whole(x)
        if len(ts) == 1:
            return x * ts[0][0]
        return x * g.rows([t[0] for t in ts], x.dim())


class MixedSelfAttention(_Op):
    """nn.MultiheadAttention (batch first, self-attention, packed in-projection) with per-group
    projections and the attention itself on the whole batch."""

    def __init__(self, active, prefix: str, mod: nn.MultiheadAttention):
        super().__init__(active, (prefix + "in_proj_weight", prefix + "in_proj_bias"))
        self.out_names = (prefix + "out_proj.weight", prefix + "out_proj.bias")
        self.heads = mod.num_heads

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("mixed attention supports self-attention only")
        g, ts = self.tensors()
        qkv = _linear_rows(g, ts, whole(query))
        b, n, d3 = qkv.shape
        q, k, v = qkv.view(b, n, 3, self.heads, d3 // (3 * self.heads)).permute(2, 0, 3, 1, 4).unbind(0)
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, n, d3 // 3)
        if self.active.record is not None:
            self.active.record.append(self.out_names)
        return _linear_rows(g, g.tensors(self.out_names), out), None


class MixedAttentionPool2d(_Op):
    """open_clip's AttentionPool2d (the ModifiedResNet's pooling): per-row positional embedding,
    per-group projections, the attention on the whole batch, batch first. Only the first token's
    output is pooled, so only it goes through the output projection."""

    def __init__(self, active, prefix: str, mod: nn.Module):
        super().__init__(active, (prefix + "positional_embedding",))
        self.heads = mod.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.c_proj = mod.q_proj, mod.k_proj, mod.v_proj, mod.c_proj

    def forward(self, x):
        x = whole(x)
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1).permute(0, 2, 1)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # the mean as a first token
        g, ts = self.tensors()
        pos = ts[0][0] if len(ts) == 1 else g.rows([t[0] for t in ts], 3)
        x = x + pos.to(x.dtype)
        n, d = x.shape[1], c // self.heads
        q, k, v = (p(x).view(b, n, self.heads, d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # [b, heads, 1, d]
        return self.c_proj(out.transpose(1, 2).reshape(b, 1, c))[:, 0]


class MixedViT(nn.Module):
    """open_clip's VisionTransformer forward with per-row class and positional embeddings and a
    per-group final projection; its submodules are mixed operations."""

    def __init__(self, active, vit):
        super().__init__()
        self.active = active
        self.vit = vit

    def _embed(self, g: Groups, name: str) -> list[torch.Tensor]:
        if self.active.record is not None:
            self.active.record.append((name,))
        return [t[0] for t in g.tensors((name,))]

    def forward(self, x):
        vit, g = self.vit, self.active.groups
        x = whole(vit.conv1(x))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self._embed(g, "class_embedding")
        cls = cls[0].view(1, 1, -1).expand(x.shape[0], -1, -1) if len(cls) == 1 else g.rows(cls, 3)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        pos = self._embed(g, "positional_embedding")
        x = x + (pos[0] if len(pos) == 1 else g.rows(pos, 3)).to(x.dtype)
        x = vit.ln_pre(vit.patch_dropout(x))
        x = vit.transformer(x)
        pooled, _ = vit._pool(x)
        proj = self._embed(g, "proj")
        return _per_group(g, [(p,) for p in proj], pooled, torch.matmul)


def _conv_kind(mod: nn.Conv2d) -> bool | None:
    """False for a plain Conv2d, True for timm's Conv2dSame, None for anything else."""
    if type(mod) is nn.Conv2d:
        return False
    try:
        from timm.layers.conv2d_same import Conv2dSame
    except ImportError:  # timm absent: no timm towers either
        return None
    return True if type(mod) is Conv2dSame else None


def _layer_norm_kind(mod) -> bool | None:
    """False for a LayerNorm computing in its input's dtype (torch's, open_clip's, timm's without
    its fused kernel), True for open_clip's LayerNormFp32, None for anything else."""
    try:
        from open_clip.transformer import LayerNorm, LayerNormFp32
    except ImportError:
        return None
    if type(mod) in (nn.LayerNorm, LayerNorm):
        return False
    if type(mod) is LayerNormFp32:
        return True
    try:
        from timm.layers.norm import LayerNorm as TimmLayerNorm
    except ImportError:
        return None
    if type(mod) is TimmLayerNorm and not getattr(mod, "_fast_norm", True):
        return False
    return None


def _is_layer_norm_2d(mod) -> bool:
    """timm's LayerNorm2d or LayerNormAct2d (a LayerNorm over the channels of NCHW, the latter
    followed by dropout and an activation), without their fused kernel."""
    try:
        from timm.layers.norm import LayerNorm2d
        from timm.layers.norm_act import LayerNormAct2d
    except ImportError:
        return False
    return type(mod) in (LayerNorm2d, LayerNormAct2d) and not getattr(mod, "_fast_norm", True)


def _batch_norm_ok(mod) -> bool:
    if type(mod) is nn.BatchNorm2d:
        return mod.track_running_stats and mod.affine
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:
        return False
    return type(mod) is BatchNormAct2d and mod.track_running_stats and mod.affine


def _mixed_module(active: _Active, prefix: str, mod: nn.Module) -> nn.Module | None:
    """The mixed replacement of ``mod`` (named ``prefix``), or None if it has none."""
    def bias():
        return prefix + "bias" if getattr(mod, "bias", None) is not None else None

    if isinstance(mod, nn.Linear) and type(mod) is nn.Linear:
        return MixedLinear(active, (prefix + "weight", bias()))
    if isinstance(mod, nn.Conv2d):
        same = _conv_kind(mod)
        return None if same is None else MixedConv(active, (prefix + "weight", bias()), mod, same)
    kind = _layer_norm_kind(mod)
    if kind is not None and mod.elementwise_affine:
        return MixedLayerNorm(active, (prefix + "weight", bias()), mod.normalized_shape, mod.eps, kind)
    if _is_layer_norm_2d(mod) and mod.elementwise_affine:
        norm = MixedLayerNorm(active, (prefix + "weight", bias()), mod.normalized_shape, mod.eps, False, True)
        # timm's LayerNormAct2d: its dropout and activation after the affine part, as their own modules
        return nn.Sequential(norm, mod.drop, mod.act) if hasattr(mod, "act") else norm
    if isinstance(mod, nn.BatchNorm2d) and _batch_norm_ok(mod):
        return MixedBatchNorm(active, (prefix + "weight", prefix + "bias"), mod)
    if type(mod).__name__ == "LayerScale" and not getattr(mod, "inplace", False):
        return MixedLayerScale(active, (prefix + "gamma",))
    if type(mod).__name__ == "AttentionPool2d" and type(mod).__module__.startswith("open_clip"):
        return MixedAttentionPool2d(active, prefix, mod)
    if (type(mod) is nn.MultiheadAttention and mod.batch_first and mod._qkv_same_embed_dim
            and mod.bias_k is None and not mod.add_zero_attn and mod.in_proj_bias is not None):
        return MixedSelfAttention(active, prefix, mod)
    return None
