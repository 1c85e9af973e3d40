"""How the server's memory is allocated: large tensors on huge pages, and glibc's malloc told when
to keep and when to hand back freed memory (no-ops under another C library)."""

from __future__ import annotations

import ctypes
import math
import mmap
import os


def use_huge_pages() -> None:
    """Ask torch to back large CPU tensors with transparent huge pages, unless the environment
    says otherwise (THP_MEM_ALLOC_ENABLE=0).

    Where the kernel's THP mode is "madvise" (a common default), torch only asks when this is set.
    With it, conv-heavy forwards run markedly faster and steadier from one process to the next
    (measured on the demo tower: about 40 ms per batch of 16 in each process tried, against
    47-66 ms without; a spread of up to about 10% between processes remains). torch reads the
    variable at its first large allocation, so call this before loading. Also keeps freed
    activations' memory for reuse (keep_freed_memory).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    keep_freed_memory()


MMAP_THRESHOLD = 32 << 20  # glibc's largest; bigger blocks are rare (a ViT-L-14 batch's activations)
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> None:
    """Have glibc's malloc reuse the memory of freed activations instead of handing it back.

    By default glibc serves a large block with a fresh mmap and unmaps it on free, so every forward
    faults its activations in again (with huge pages, the kernel may also compact memory on the
    fault). Measured on the demo tower: a pointwise convolution with a 25 MB output took 28 ms in a
    fresh block against 0.8 ms in a reused one, and the first batches of a process ran at half
    speed until glibc's own threshold had adapted. Serving blocks up to 32 MiB from the heap and
    trimming it only past 256 MiB of free space keeps them warm. Skipped where the C library is
    not glibc or the environment sets glibc's own MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (also stops glibc's dynamic adjustment)
    mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD


def release_freed_memory() -> None:
    """Hand the pages of freed memory back to the system (glibc's malloc_trim).

    A router rebuild builds a new index beside the old one on a thread of its own, and frees the
    old index and its temporaries there; glibc keeps what a thread freed in that thread's arena. On
    a bank grown by uploads to 3,006 distinct switches, with four rebuilds on the way, the server held
    4.3 GB against 2.8 GB after a restart on the same bank; in process, trimming after the
    rebuilds gave back 823 MB. Called after each rebuild (rare), it also hands back the
    engine's freed activations, which the next batch faults in again once.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


PLAIN_MIN = 2 << 20  # smaller tensors would not be given huge pages anyway


def plain_pages(shape: tuple[int, ...], dtype):
    """An uninitialised CPU tensor on ordinary pages, never transparent huge pages: for large tables
    written once and then read in order, such as the router's rows.

    With huge pages asked for (use_huge_pages) and the kernel's THP defrag at "madvise" (a common
    default), every first touch of a fresh 2 MiB page may wait for the kernel to compact memory:
    writing a fresh 256 MB table took 0.27-0.29 s here, against 0.05-0.08 s on ordinary pages, and
    the router writes one such table per 100,000 vectors while the server starts. A scan over the
    table runs as fast on either (a bfloat16 scan of 100,000 1280-d rows: 14.7-15.2 ms). The pages
    are an anonymous mapping, handed back when the tensor is freed.
    """
    import torch  # here: the server imports this module before torch, on another thread

    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < PLAIN_MIN:
        return torch.empty(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype).view(shape)
