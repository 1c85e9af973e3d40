"""The fused merge kernel (fused.py) and the mixing of copies (mixed_ops.Copies), compiled by numba.
Imported on first use rather than with the library: numba's import and the kernel's loading from its
cache take about a second, which programs that never merge (the bank tools, a client) need not
spend."""

from __future__ import annotations

import numba  # noqa: F401  (fused.merge sets its thread count through it)
import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from .numba_target import load as _load_target

_load_target()


def _pointer(kind):
    @intrinsic
    def cast(typingctx, addr):
        ptr = types.CPointer(kind)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr))

        return ptr(types.intp), codegen

    return cast


_f32 = _pointer(types.float32)
_u8 = _pointer(types.uint8)


@njit(inline="always")
def _ternary(m, mp, b):
    # bit b of mask m and of mp = m & pos gives 2 * mp - m in {-1, 0, +1}, as an integer first,
    # as torch decodes it: a dropped entry is +0.0, never -0.0
    return np.float32(2 * ((mp >> b) & 1) - ((m >> b) & 1))


def _merge_py(base_addr, out_addr, mask_addr, pos_addr, coef, items, bounds):
    n_terms = coef.shape[0]
    # one iteration per thread, each over a run of items holding an equal share of elements
    for w in prange(bounds.shape[0] - 1):
        for k in range(bounds[w], bounds[w + 1]):
            _block(base_addr, out_addr, mask_addr, pos_addr, coef, n_terms, items[k, 0], items[k, 1], items[k, 2])


@njit(inline="always")
def _block(base_addr, out_addr, mask_addr, pos_addr, coef, n_terms, i, e0, e1):
    # views that start at the block: indices from 0 up keep the loops vectorisable
    n = e1 - e0
    base = carray(_f32(base_addr[i] + 4 * e0), n)
    out = carray(_f32(out_addr[i] + 4 * e0), n)
    full = n >> 3
    first = True
    for t in range(n_terms):
        c = coef[t, i]
        if c == 0.0:
            continue
        mask = carray(_u8(mask_addr[t, i] + (e0 >> 3)), (n + 7) >> 3)
        pos = carray(_u8(pos_addr[t, i] + (e0 >> 3)), (n + 7) >> 3)
        # two copies of the loop so that each is a plain stream the compiler vectorises
        if first:
            for j in range(full):
                m = np.int32(mask[j])
                mp = m & np.int32(pos[j])
                for b in range(8):
                    out[8 * j + b] = base[8 * j + b] + c * _ternary(m, mp, b)
        else:
            for j in range(full):
                m = np.int32(mask[j])
                mp = m & np.int32(pos[j])
                for b in range(8):
                    out[8 * j + b] = out[8 * j + b] + c * _ternary(m, mp, b)
        for e in range(8 * full, n):
            m = np.int32(mask[e >> 3])
            term = c * _ternary(m, m & np.int32(pos[e >> 3]), e & 7)
            out[e] = (base[e] if first else out[e]) + term
        first = False
    if first:  # no term touches this block: the caller never asks for it, but stay correct
        for e in range(n):
            out[e] = base[e]


def _compiled(fn, **options):
    try:
        return njit(cache=True, **options)(fn)
    except RuntimeError:  # no writable cache directory: compile in memory
        return njit(**options)(fn)


merge = _compiled(_merge_py, parallel=True, boundscheck=False, error_model="numpy", nogil=True)


MIX_BLOCK = 4096  # columns summed at a time: 16 KB of float32, which stays in L1


def _mix_py(data, pos, start, weight):
    # request r's copies are rows pos[start[r]:start[r + 1]] of data, with those weights: each gets
    # their weighted sum, MIX_BLOCK columns at a time
    n = data.shape[1]
    acc = np.empty(min(n, MIX_BLOCK), np.float32)
    for r in range(start.shape[0] - 1):
        a, b = start[r], start[r + 1]
        for lo in range(0, n, MIX_BLOCK):
            m = min(MIX_BLOCK, n - lo)
            row = data[pos[a], lo:lo + m]
            w = weight[a]
            for i in range(m):
                acc[i] = w * row[i]
            for j in range(a + 1, b):
                row = data[pos[j], lo:lo + m]
                w = weight[j]
                for i in range(m):
                    acc[i] += w * row[i]
            for j in range(a, b):
                row = data[pos[j], lo:lo + m]
                for i in range(m):
                    row[i] = acc[i]


# one thread, so no launch from two Python threads can meet in numba's thread pool (see fused._LOCK)
mix = _compiled(_mix_py, boundscheck=False, error_model="numpy", nogil=True)
