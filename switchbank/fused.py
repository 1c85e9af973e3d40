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
holds every tensor while the kernel runs. numba compiles the kernel on first use (cached on disk
where a cache directory is writable).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

try:
    import numba
    from numba import carray, njit, prange, types
    from numba.extending import intrinsic
except ImportError:  # the torch path still works, only slower
    numba = None

AVAILABLE = numba is not None

BLOCK = 1 << 15  # elements per work item: one fp32 block stays in L2 while all switches are added

# numba's fallback thread pool (workqueue) aborts on concurrent launches from two Python threads
_LOCK = threading.Lock()


if AVAILABLE:

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

    _OPTIONS = dict(parallel=True, boundscheck=False, error_model="numpy", nogil=True)
    try:
        _merge = njit(cache=True, **_OPTIONS)(_merge_py)
    except RuntimeError:  # no writable cache directory: compile in memory
        _merge = njit(**_OPTIONS)(_merge_py)


class Unsupported(ValueError):
    """The tensors are not what the kernel reads (contiguous fp32 on the CPU): use torch ops."""


def _plain(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()


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
    if not all(_plain(term.mask, torch.uint8) and _plain(term.pos, torch.uint8) for term in terms):
        raise Unsupported("the fused kernel needs contiguous uint8 CPU bit buffers")
    n_tensors, n_terms = len(base), len(terms)
    numel = np.fromiter((t.numel() for t in base), dtype=np.int64, count=n_tensors)
    coef = np.zeros((n_terms, n_tensors), dtype=np.float32)
    mask_addr = np.zeros((n_terms, n_tensors), dtype=np.int64)
    pos_addr = np.zeros((n_terms, n_tensors), dtype=np.int64)
    for t, term in enumerate(terms):
        ends = term.offset + (numel[term.index] + 7) // 8
        if len(ends) and (term.offset.min() < 0 or ends.max() > min(term.mask.numel(), term.pos.numel())):
            raise ValueError(f"switch bits out of range: need bytes {int(term.offset.min())}..{int(ends.max())}")
        coef[t, term.index] = term.coef
        mask_addr[t, term.index] = term.mask.data_ptr() + term.offset
        pos_addr[t, term.index] = term.pos.data_ptr() + term.offset
    if out is None:
        out = [torch.empty_like(t) for t in base]
    elif len(out) != n_tensors or not supports(out) or any(o.numel() != t.numel() for o, t in zip(out, base)):
        raise Unsupported("out must be contiguous fp32 CPU tensors of the base tensors' sizes")
    base_addr = np.fromiter((t.data_ptr() for t in base), dtype=np.int64, count=n_tensors)
    out_addr = np.fromiter((t.data_ptr() for t in out), dtype=np.int64, count=n_tensors)
    items = _items(numel)
    if not len(items):  # nothing but empty tensors
        return out
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    with _LOCK:
        numba.set_num_threads(threads)
        _merge(base_addr, out_addr, mask_addr, pos_addr, coef, items, _bounds(items, threads))
    return out


def warm_up() -> None:
    """Compile (or load) the kernel now rather than on the first request."""
    if not AVAILABLE:
        return
    bits = torch.tensor([0b101, 0b001], dtype=torch.uint8)
    one = np.zeros(1, dtype=np.int64)
    merge([torch.zeros(11)], [Term(bits, bits, one, one, np.ones(1, dtype=np.float32))])
