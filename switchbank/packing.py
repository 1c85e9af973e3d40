"""Bit packing of activation masks and polarities, vectorised (no per-element Python loops).

Bit order: element i of a block of 8 is bit i of its byte (LSB first), as numpy's
``packbits(bitorder="little")``.

Two forms:
- dense (in memory): ``mask`` bits for every element plus ``pos`` bits for every element
  (1 where the entry was kept and positive). 2 bits per parameter, and one table look-up per
  byte pair turns it into a ternary tensor {-1, 0, +1}.
- compact (on disk): ``mask`` bits for every element plus one sign bit per *kept* element, in
  element order: 1 + (1 - alpha) bits per parameter.
"""

from __future__ import annotations

import threading

import numpy as np
import torch


def packed_len(n: int) -> int:
    """Bytes needed for ``n`` bits."""
    return (n + 7) // 8


def pack_bits(bits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pack a flat boolean array into uint8, LSB first."""
    if isinstance(bits, torch.Tensor):
        bits = bits.detach().to("cpu", torch.bool).numpy()
    return np.packbits(np.asarray(bits, dtype=bool).reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a bool tensor (on ``packed``'s device)."""
    if not isinstance(packed, torch.Tensor):
        packed = torch.from_numpy(np.ascontiguousarray(packed, dtype=np.uint8))
    if packed.numel() < packed_len(n):
        raise ValueError(f"need {packed_len(n)} bytes for {n} bits, got {packed.numel()}")
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:n].to(torch.bool)


def encode_compact(mask: torch.Tensor, positive: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """(mask bits, sign bits of the kept entries only, number kept) for flat bool tensors."""
    mask = mask.reshape(-1).to("cpu", torch.bool)
    kept_signs = positive.reshape(-1).to("cpu", torch.bool)[mask]
    return pack_bits(mask), pack_bits(kept_signs), int(kept_signs.numel())


def compact_to_dense(mask_bytes: np.ndarray, sign_bytes: np.ndarray, n: int, n_kept: int) -> np.ndarray:
    """Turn compact sign bits into dense ``pos`` bits (1 where kept and positive)."""
    mask = np.unpackbits(mask_bytes, count=n, bitorder="little").astype(bool)
    if int(mask.sum()) != n_kept:
        raise ValueError(f"mask has {int(mask.sum())} set bits, expected {n_kept}")
    pos = np.zeros(n, dtype=bool)
    pos[mask] = np.unpackbits(sign_bytes, count=n_kept, bitorder="little").astype(bool)
    return pack_bits(pos)


def dense_to_compact(mask_bytes: np.ndarray, pos_bytes: np.ndarray, n: int) -> np.ndarray:
    """Sign bits of the kept entries only, from the dense form."""
    mask = np.unpackbits(mask_bytes, count=n, bitorder="little").astype(bool)
    pos = np.unpackbits(pos_bytes, count=n, bitorder="little").astype(bool)
    return pack_bits(pos[mask])


_TABLES: dict[tuple[str, torch.dtype], torch.Tensor] = {}
_TABLES_LOCK = threading.Lock()


def _ternary_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[65536, 8] table: row (mask_byte << 8 | pos_byte) holds the 8 ternary values it encodes."""
    key = (str(device), dtype)
    table = _TABLES.get(key)
    if table is None:
        with _TABLES_LOCK:
            table = _TABLES.get(key)
            if table is None:
                codes = torch.arange(65536, dtype=torch.int32)
                shifts = torch.arange(8, dtype=torch.int32)
                m = ((codes >> 8).unsqueeze(1) >> shifts) & 1
                p = ((codes & 0xFF).unsqueeze(1) >> shifts) & 1
                # pos is only meaningful where mask is set; 2p - m gives +1, -1 or 0 there.
                table = ((2 * p - m) * m).to(dtype).to(device)
                _TABLES[key] = table
    return table


def ternary(mask_bytes: torch.Tensor, pos_bytes: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Decode dense bits to a flat tensor of -1/0/+1 (on the bytes' device)."""
    table = _ternary_table(mask_bytes.device, dtype)
    codes = (mask_bytes.to(torch.int32) << 8) | pos_bytes.to(torch.int32)
    return table.index_select(0, codes).reshape(-1)[:n]


# --- Rice coding of sparse masks --------------------------------------------------------------
# A mask with few set bits is stored as the gaps between set bits (zeros before each one), each gap
# split into q = gap >> k (unary: q zeros then a one) and r = gap & (2**k - 1) (k plain bits). The
# unary parts and the remainders go to two separate bit streams, so that encoding and decoding are
# both vectorised: the set bits of the unary stream mark where each code ends.


def rice_parameter(gaps: np.ndarray) -> tuple[int, int]:
    """(k, total bits) of the cheapest Rice code for ``gaps``."""
    best = (0, -1)
    m = gaps.size
    for k in range(0, 32):
        bits = int((gaps >> k).sum()) + m * (1 + k)
        if best[1] < 0 or bits < best[1]:
            best = (k, bits)
        elif bits > best[1]:
            break
    return best


def rice_encode(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(stream bytes, k, unary bit count) for a flat bool mask. Stream = unary bytes + remainder bytes."""
    ones = np.flatnonzero(mask)
    gaps = np.diff(ones, prepend=-1) - 1
    k, _ = rice_parameter(gaps)
    q = gaps >> k
    ends = np.cumsum(q + 1) - 1
    unary_bits = int(ends[-1]) + 1 if ends.size else 0
    unary = np.zeros(unary_bits, dtype=bool)
    unary[ends] = True
    rem = ((gaps[:, None] >> np.arange(k)) & 1).astype(bool).reshape(-1) if k else np.zeros(0, bool)
    return np.concatenate([pack_bits(unary), pack_bits(rem)]), k, unary_bits


def rice_len(kept: int, k: int, unary_bits: int) -> int:
    """Bytes of a Rice stream."""
    return packed_len(unary_bits) + packed_len(kept * k)


def rice_decode(stream: np.ndarray, n: int, kept: int, k: int, unary_bits: int) -> np.ndarray:
    """The flat bool mask of length ``n`` back from :func:`rice_encode`'s stream."""
    ub = packed_len(unary_bits)
    if stream.size != rice_len(kept, k, unary_bits):
        raise ValueError("Rice stream has the wrong length")
    ends = np.flatnonzero(np.unpackbits(stream[:ub], count=unary_bits, bitorder="little"))
    if ends.size != kept:
        raise ValueError(f"Rice stream encodes {ends.size} set bits, expected {kept}")
    q = np.diff(ends, prepend=-1) - 1
    gaps = q << k
    if k:
        rem = np.unpackbits(stream[ub:], count=kept * k, bitorder="little").reshape(kept, k).astype(np.int64)
        gaps = gaps + (rem << np.arange(k)).sum(1)
    positions = np.cumsum(gaps + 1) - 1
    if positions.size and positions[-1] >= n:
        raise ValueError("Rice stream points past the end of the tensor")
    mask = np.zeros(n, dtype=bool)
    mask[positions] = True
    return mask


# --- sign bits of the kept entries -> the dense pos plane, for a whole switch at once ----------
# Each mask byte m with c set bits takes the next c sign bits s and places them on m's set bits:
# DEPOSIT[m, s] (a 256 x 256 table, bit-deposit of s into m). Tensors start on byte boundaries in
# both streams, so the work is one pass over the mask bytes.
def _deposit_table() -> np.ndarray:
    m = np.arange(256)[:, None]
    s = np.arange(256)[None, :]
    out = np.zeros((256, 256), dtype=np.int64)
    taken = np.zeros((256, 1), dtype=np.int64)
    for b in range(8):
        on = (m >> b) & 1
        out |= (((s >> taken) & 1) & on) << b
        taken = taken + on
    return out.astype(np.uint8)


DEPOSIT = _deposit_table()
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
LOWBIT = np.array([0] + [(i & -i).bit_length() - 1 for i in range(1, 256)], dtype=np.int64)

_LOAD = threading.Lock()
_KERNELS = None


def _kernels():
    """The decoding kernels' module, imported on first use; None where numba cannot be imported
    (the per-tensor numpy path is used then)."""
    global _KERNELS
    if _KERNELS is None:
        with _LOAD:
            if _KERNELS is None:
                try:
                    from . import bits_kernel as k
                except (ImportError, RuntimeError):
                    k = False
                _KERNELS = k
    return _KERNELS or None


def expand_signs(mask: np.ndarray, sign: np.ndarray, m_len: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The dense pos plane for a switch's dense mask plane (tensors back to back, ``m_len`` bytes
    each) and its compact sign stream (``packed_len(kept)`` bytes per tensor). Raises ValueError
    when a tensor's mask does not hold exactly ``kept`` set bits."""
    m_len = np.asarray(m_len, dtype=np.int64)
    kept = np.asarray(kept, dtype=np.int64)
    m_start = np.concatenate([[0], np.cumsum(m_len)[:-1]]).astype(np.int64)
    s_start = np.concatenate([[0], np.cumsum((kept + 7) // 8)[:-1]]).astype(np.int64)
    pos = np.zeros_like(mask)
    kernels = _kernels()
    if kernels is not None:
        counts = np.zeros(len(m_len), dtype=np.int64)
        kernels.expand(mask, sign, m_start, m_len, s_start, DEPOSIT, POPCOUNT, pos, counts)
        bad = np.flatnonzero(counts != kept)
        if bad.size:
            raise ValueError(f"tensor {int(bad[0])}: mask has {int(counts[bad[0]])} set bits, expected {int(kept[bad[0]])}")
        return pos
    for t in range(len(m_len)):
        a, b = m_start[t], m_start[t] + m_len[t]
        pos[a:b] = compact_to_dense(mask[a:b], sign[s_start[t]:s_start[t] + (kept[t] + 7) // 8], int(m_len[t]) * 8,
                                    int(kept[t]))
    return pos

def rice_to_bitmap(stream: np.ndarray, n: int, kept: int, k: int, unary_bits: int) -> np.ndarray:
    """The packed bitmap of a Rice-coded mask (as pack_bits(rice_decode(...)), faster)."""
    if stream.size != rice_len(kept, k, unary_bits):
        raise ValueError("Rice stream has the wrong length")
    kernels = _kernels()
    if kernels is None:
        return pack_bits(rice_decode(stream, n, kept, k, unary_bits))
    out = np.zeros(packed_len(n), dtype=np.uint8)
    got = kernels.rice_bitmap(np.ascontiguousarray(stream), unary_bits, kept, k, n, LOWBIT, out)
    if got == -1:
        raise ValueError("Rice stream points past the end of the tensor")
    if got != kept:
        raise ValueError(f"Rice stream encodes {got} set bits, expected {kept}")
    return out


def warm_up() -> None:
    """Compile (or load) the decoding kernels now rather than inside the first cold switch's load."""
    mask = pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=bool))
    expand_signs(mask, pack_bits(np.array([1, 0, 1, 1, 0], dtype=bool)), [2], [5])
    stream, k, ub = rice_encode(np.array([0, 1, 0, 0, 1] * 3, dtype=bool))
    rice_to_bitmap(stream, 15, 6, k, ub)
