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
