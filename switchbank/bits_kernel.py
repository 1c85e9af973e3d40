"""The numba kernels that decode a switch's bits (packing.py). Imported on first use rather than
with the library: numba's import takes about half a second, which programs that never decode a
switch's bits (listing a bank, a client) need not spend."""

from __future__ import annotations

import numpy as np
from numba import njit

from .numba_target import load as _load_target

_load_target()


@njit(cache=True, nogil=True, boundscheck=False)
def expand(mask, sign, m_start, m_len, s_start, deposit, popcount, pos, counts):
    n_sign = sign.shape[0]
    for t in range(m_start.shape[0]):
        bit = s_start[t] * 8
        c_total = 0
        for j in range(m_start[t], m_start[t] + m_len[t]):
            m = mask[j]
            c = popcount[m]
            byte = bit >> 3
            v = np.int64(sign[byte]) if byte < n_sign else np.int64(0)
            if byte + 1 < n_sign:
                v |= np.int64(sign[byte + 1]) << 8
            s = (v >> (bit & 7)) & ((1 << c) - 1)
            pos[j] = deposit[m, s]
            bit += c
            c_total += c
        counts[t] = c_total


@njit(cache=True, nogil=True, boundscheck=True)
def rice_bitmap(stream, unary_bits, kept, k, n, lowbit, out):
    """Set the bits a Rice stream encodes in ``out`` (a zeroed bitmap); returns the number of
    codes read, or -1 when a position falls outside the tensor."""
    ub = (unary_bits + 7) >> 3
    size = stream.shape[0]
    u = 0  # bit position in the unary stream
    r = ub * 8  # bit position of the remainders
    pos = -1
    for i in range(kept):
        q = 0
        while True:  # the next set bit of the unary stream, a byte at a time
            if u >= unary_bits:
                return i
            v = np.int64(stream[u >> 3]) >> (u & 7)
            if v == 0:
                q += 8 - (u & 7)
                u += 8 - (u & 7)
                continue
            tz = lowbit[v]
            q += tz
            u += tz + 1
            break
        if u > unary_bits:
            return i
        rem = np.int64(0)
        if k:
            byte = r >> 3
            for j in range(5):
                if byte + j < size:
                    rem |= np.int64(stream[byte + j]) << (8 * j)
            rem = (rem >> (r & 7)) & ((np.int64(1) << k) - 1)
            r += k
        pos += (q << k) + rem + 1
        if pos >= n:
            return -1
        out[pos >> 3] |= np.uint8(1 << (pos & 7))
    return kept
