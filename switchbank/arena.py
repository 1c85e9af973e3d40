"""Long-lived tensors built on a thread of their own, away from the forward's memory.

glibc's malloc serves each thread from an arena of its own, and keeps freed memory there for reuse
(allocator.keep_freed_memory). A batch's activations are freed when it ends, and the next batch's
reuse the same blocks without touching a new page. A cached tower built on the engine's thread
between two batches takes some of those blocks for good; the next forward then no longer fits
where it did, and faults fresh pages in for its activations. Built on another thread, the tower
lands in that thread's arena and the forward keeps its memory: on the demo's mixed traffic, the
forwards of 50 batches that built 36 towers faulted in 2,300-2,800 pages instead of 90,000-95,000,
and a batch took 4-7% less time (bench/build_cost.py). The build faults in its own pages instead.

The thread ends with each build. A thread that runs torch's parallel operations keeps a team of
OpenMP workers while it lives, and more workers than cores slow every small operation of the
engine's forward (docs/architecture.md, "One thread for torch"). glibc hands an ended thread's
arena to the next new thread, so the next build lands beside the last. Under another C library the
hand-off costs a thread start.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_apart = threading.local()


def run_apart(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on a new thread, with the caller's grad and inference modes (which
    are thread-local in torch); its exception, if any, is raised here. Called from such a thread,
    runs ``fn`` there."""
    if getattr(_apart, "inside", False):
        return fn(*args, **kwargs)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    out: dict = {}

    def call():
        _apart.inside = True
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller
            out["error"] = exc

    thread = threading.Thread(target=call, name="switchbank-build", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
