"""Background work (router rebuilds, uploads, bank syncs) yields the CPU to requests.

On a machine with few cores a rebuild of the router's index competes with the forwards it routes:
faiss trains and fills the new index on an OpenMP team of its own beside torch's. Measured at 3,006
distinct switches on 2 cores, one Auto-Switch request at a time while the IVF index rebuilt (10-11
s): 54-57 ms per request at the median (95th percentile 95-122 ms), against 21-29 ms when idle. With
the rebuild's thread at a lower priority, 32-39 ms (49-64 ms); with faiss also kept to that one
thread, 27-28 ms (55-58 ms), the rebuild taking 12.6-13.7 s.
"""

from __future__ import annotations

import os
import threading

NICENESS = 10  # added to the thread's nice value: a tenth of the CPU share of a normal thread


def lower_this_thread(niceness: int = NICENESS) -> None:
    """Lower the calling thread's CPU priority, and that of the threads it starts from now on (an
    OpenMP team inherits it). Linux sets nice values per thread; elsewhere, or where it is not
    allowed, this does nothing."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except (AttributeError, OSError):
        pass
