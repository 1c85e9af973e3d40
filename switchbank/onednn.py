"""oneDNN's operations as torch's CPU inductor emits them (a matrix product with the bias and an
activation fused, a convolution with a fused activation, weight reorders into oneDNN's blocked
layout), each found once, where this torch build has it and it answers like torch's own; None where
not. The towers' linear layers and pointwise convolutions and the router's float32 scan run on
:func:`linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _find_linear():
    """oneDNN's matrix product with the bias fused (the op torch's CPU inductor emits), where this
    torch build has it and it answers like F.linear; else None."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
        with torch.inference_mode():
            ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
        return op if ok and torch.backends.mkldnn.is_available() else None
    except Exception:  # a build without oneDNN, or a torch that dropped or renamed the op
        return None


def _find_conv():
    """oneDNN's convolution with a fused activation (also an op of torch's CPU inductor), where
    this torch build has it and it answers like F.conv2d followed by the activation; else None."""
    try:
        op = torch.ops.mkldnn._convolution_pointwise
        x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(4, 1, 3, 3), torch.randn(4)
        with torch.inference_mode():
            got = op(x, w, b, [1, 1], [1, 1], [1, 1], 4, "hardtanh", [0.0, 6.0], "")
            ok = torch.allclose(got, F.conv2d(x, w, b, 1, 1, 1, 4).clamp(0, 6), atol=1e-5)
        return op if ok and torch.backends.mkldnn.is_available() else None
    except Exception:
        return None


def _packers():
    """oneDNN's weight reorders (its own blocked layout, as torch's CPU inductor prepacks them),
    where this build has them and the reordered weights give the plain weights' outputs; else
    (None, None). Given a plain weight, the oneDNN ops reorder it on every call: about 20-40 us a
    call at the demo tower's shapes, and a mixed batch makes a call per group."""
    try:
        conv_op, linear_op = torch.ops.mkldnn._reorder_convolution_weight, torch.ops.mkldnn._reorder_linear_weight
        x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(4, 1, 3, 3), torch.randn(4)
        x2, w2, b2 = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
        with torch.inference_mode():
            wp = conv_op(w, [1, 1], [1, 1], [1, 1], 4, list(x.shape))
            ok = torch.equal(CONV(x, wp, b, [1, 1], [1, 1], [1, 1], 4, "relu", [], ""),
                             CONV(x, w, b, [1, 1], [1, 1], [1, 1], 4, "relu", [], ""))
            ok = ok and torch.equal(LINEAR(x2, linear_op(w2, 3), b2, "none", [], ""),
                                    LINEAR(x2, w2, b2, "none", [], ""))
        return (conv_op, linear_op) if ok else (None, None)
    except Exception:
        return None, None


# On CPU, fp32, oneDNN's matmul runs the towers' linear shapes about twice as fast as torch.addmm
# (MKL's sgemm, then a separate pass for the bias) on the AMD machine measured (bench/linear.py).
LINEAR = _find_linear()
CONV = _find_conv()
PACK_CONV, PACK_LINEAR = _packers() if LINEAR is not None and CONV is not None else (None, None)
NO_ACT = ("none", [])  # a oneDNN post-op: (name, scalars)


def dense(w: torch.Tensor, shape) -> torch.Tensor:
    """A weight in torch's own layout and ``shape``: a view of ``w`` (a pointwise convolution's
    [out, in, 1, 1] weight as the [out, in] of a matrix product), or a reordered oneDNN weight
    turned back."""
    return w.to_dense().reshape(shape) if w.is_mkldnn else w.reshape(shape)


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the oneDNN ops can take these tensors (fp32 on the CPU)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, act: tuple = NO_ACT) -> torch.Tensor:
    """F.linear over the last dimension of ``x``, on oneDNN for fp32 CPU tensors where available.
    ``act`` (a oneDNN post-op, see mixed_ops.MixedConv.fused_act) is only passed where oneDNN runs it."""
    if LINEAR is not None and takes(x, w):
        x2 = x.reshape(-1, x.shape[-1])
        out = LINEAR(x2, w if w.is_mkldnn else w.reshape(w.shape[0], -1), bias, act[0], act[1], "")
        return out.view(*x.shape[:-1], out.shape[-1])
    assert act is NO_ACT, "an activation can only be fused into oneDNN's matmul"
    return F.linear(x, dense(w, (w.shape[0], -1)), bias)
