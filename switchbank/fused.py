"""Single-pass merge on the CPU: theta = theta0 + sum_t c_t * ternary_t, straight from packed bits.

With torch ops a merge costs three passes per switch (bits -> int8 -> fp32 -> add) plus one
dispatch per tensor, several times the cost of copying the base. This kernel reads each base
element once, adds every switch's term while its block is still in cache and writes the result
once, so merging costs about what cloning the tower costs, and each further switch adds only the
reading of its bits (1/16 of the fp32 bytes).

Results are bitwise those of the torch path: every term c * {-1, 0, +1} is exact in fp32, and the
terms are added in the same order, one rounding per switch.

Tensors are passed by address so that each merged tensor is its own allocation, as a clone's would
be; merge() checks devices, dtypes, contiguity and bit lengths before any address is taken, and
holds every tensor while the kernel runs. The kernel (merge_kernel.py) is imported on the first
merge or warm_up(), and numba compiles it then (cached on disk where a cache directory is writable).
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass

import numpy as np
import torch

# numba is imported with the kernel, on the first merge (merge_kernel.py); without it the torch
# path still works, only slower
AVAILABLE = importlib.util.find_spec("numba") is not None

BLOCK = 1 << 15  # elements per work item: one fp32 block stays in L2 while all switches are added

# numba's fallback thread pool (workqueue) aborts on concurrent launches from two Python threads
_LOCK = threading.Lock()
_LOAD = threading.Lock()
_KERNEL = None


def kernel():
    """The kernels' module (merge_kernel), imported on first use; Unsupported where numba cannot be
    imported."""
    global _KERNEL, AVAILABLE
    if _KERNEL is None:
        with _LOAD:
            if _KERNEL is None and AVAILABLE:
                try:
                    from . import merge_kernel
                except (ImportError, RuntimeError):  # a numba that does not load: supports() says no from now on
                    AVAILABLE = False
                else:
                    _KERNEL = merge_kernel
    if _KERNEL is None:
        raise Unsupported("numba is not available")
    return _KERNEL


class Unsupported(ValueError):
    """The tensors are not what the kernel reads (contiguous fp32 on the CPU): use torch ops."""


def _plain(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``t`` is a contiguous CPU tensor of ``dtype``: a buffer the kernel may read by address."""
    return t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()


def bit_addresses(mask: torch.Tensor, pos: torch.Tensor, offset: np.ndarray,
                  numel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The addresses of a switch's bits for tensors of ``numel`` elements whose bits start at byte
    ``offset`` of its ``mask`` and ``pos`` buffers, once both are checked to be buffers the kernel
    may read (contiguous uint8 on the CPU) holding every one of those tensors' bits."""
    if not (_plain(mask, torch.uint8) and _plain(pos, torch.uint8)):
        raise Unsupported("the fused kernel needs contiguous uint8 CPU bit buffers")
    ends = offset + (numel + 7) // 8
    if len(ends) and (offset.min() < 0 or ends.max() > min(mask.numel(), pos.numel())):
        raise ValueError(f"switch bits out of range: need bytes {int(offset.min())}..{int(ends.max())}")
    return mask.data_ptr() + offset, pos.data_ptr() + offset


def supports(base) -> bool:
    """Whether the kernel can merge over ``base`` (tensors): CPU, fp32, contiguous."""
    return AVAILABLE and all(_plain(t, torch.float32) for t in base)


@dataclass
class Term:
    """One switch's share of a merge: its bit buffers, and for each tensor it touches the tensor's
    index in the merged list, the byte offset of its bits and its coefficient (weight * lambda)."""

    mask: torch.Tensor
    pos: torch.Tensor
    index: np.ndarray
    offset: np.ndarray
    coef: np.ndarray


def _bounds(items: np.ndarray, workers: int) -> np.ndarray:
    """Item indices splitting ``items`` into ``workers`` contiguous runs of about equal elements."""
    ends = np.cumsum(items[:, 2] - items[:, 1])
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, workers) / workers, side="right")
    return np.concatenate([[0], cuts, [len(items)]]).astype(np.int64)


def _items(numel: np.ndarray) -> np.ndarray:
    """(tensor, first element, end element) work items of at most BLOCK elements (a multiple of 8)."""
    blocks = -(-numel // BLOCK)
    tensor = np.repeat(np.arange(len(numel)), blocks)
    first = np.arange(len(tensor)) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    e0 = first * BLOCK
    return np.stack([tensor, e0, np.minimum(e0 + BLOCK, numel[tensor])], axis=1).astype(np.int64)


def merge(base: list[torch.Tensor], terms: list[Term], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Merged copies of ``base`` (contiguous fp32 CPU tensors), each term added in order.

    Each result is a new tensor shaped as its base tensor (a plain copy where no term touches it),
    or is written into ``out`` (contiguous fp32 CPU tensors of the same sizes, such as views of
    one scratch buffer). A base tensor may appear several times, to merge several combinations
    over the same weights in one call.
    """
    # the kernel reads raw addresses: anything but plain contiguous buffers would be misread
    if not supports(base):
        raise Unsupported("the fused kernel needs contiguous fp32 CPU tensors")
    n_tensors, n_terms = len(base), len(terms)
    numel = np.fromiter((t.numel() for t in base), dtype=np.int64, count=n_tensors)
    coef = np.zeros((n_terms, n_tensors), dtype=np.float32)
    mask_addr = np.zeros((n_terms, n_tensors), dtype=np.int64)
    pos_addr = np.zeros((n_terms, n_tensors), dtype=np.int64)
    for t, term in enumerate(terms):
        coef[t, term.index] = term.coef
        mask_addr[t, term.index], pos_addr[t, term.index] = bit_addresses(term.mask, term.pos, term.offset,
                                                                          numel[term.index])
    if out is None:
        out = [torch.empty_like(t) for t in base]
    elif len(out) != n_tensors or not supports(out) or any(o.numel() != t.numel() for o, t in zip(out, base)):
        raise Unsupported("out must be contiguous fp32 CPU tensors of the base tensors' sizes")
    base_addr = np.fromiter((t.data_ptr() for t in base), dtype=np.int64, count=n_tensors)
    out_addr = np.fromiter((t.data_ptr() for t in out), dtype=np.int64, count=n_tensors)
    merge_at(base_addr, out_addr, numel, mask_addr, pos_addr, coef)
    return out


def merge_at(base_addr: np.ndarray, out_addr: np.ndarray, numel: np.ndarray, mask_addr: np.ndarray,
             pos_addr: np.ndarray, coef: np.ndarray) -> None:
    """The kernel over addresses: for each tensor i (numel[i] fp32 elements at base_addr[i], written
    to out_addr[i]) and term t, coef[t, i] times the ternary whose bits lie at mask_addr[t, i] and
    pos_addr[t, i] (a zero coef adds nothing). Nothing is checked here: the caller has checked every
    buffer as :func:`merge` does (:func:`supports`, :func:`bit_addresses`), and holds them while
    this runs."""
    items = _items(numel)
    if not len(items):  # nothing but empty tensors
        return
    k = kernel()
    threads = max(1, min(torch.get_num_threads(), k.numba.config.NUMBA_NUM_THREADS))
    with _LOCK:
        k.numba.set_num_threads(threads)
        k.merge(base_addr, out_addr, mask_addr, pos_addr, coef, items, _bounds(items, threads))


def warm_up() -> None:
    """Compile (or load) the kernel now rather than on the first request."""
    if not AVAILABLE:
        return
    bits = torch.tensor([0b101, 0b001], dtype=torch.uint8)
    one = np.zeros(1, dtype=np.int64)
    try:
        merge([torch.zeros(11)], [Term(bits, bits, one, one, np.ones(1, dtype=np.float32))])
    except Unsupported:  # numba does not load here: merges take the torch path
        pass
