"""Loading numba's CPU target, once, before the first kernel here is compiled or read from cache.

The first time numba loads a kernel, its CPU target imports its numpy implementations, and one of
them probes for BLAS by importing scipy.linalg: about 0.1 s of a server's start-up where scipy is
installed (the demo's datasets bring it), for products these kernels never compute. Loaded here,
that probe finds no scipy.linalg and numba uses its own loops for np.dot-like calls; scipy itself
is untouched, and the first import of scipy.linalg after this succeeds as usual.
"""

from __future__ import annotations

import sys
import threading

_LOCK = threading.Lock()
_LOADED = False


def load() -> None:
    global _LOADED
    with _LOCK:
        if _LOADED:
            return
        from numba.core.registry import cpu_target

        blocked = "scipy.linalg" not in sys.modules
        if blocked:
            sys.modules["scipy.linalg"] = None  # importing it raises ImportError meanwhile
        try:
            cpu_target.target_context.refresh()
        finally:
            if blocked and sys.modules.get("scipy.linalg", False) is None:
                del sys.modules["scipy.linalg"]
        _LOADED = True
