"""Seconds the current thread has spent inside collectives, so compute timers can leave them out.

The sim backend stretches each compute chunk by (1/speed - 1) x its time; a chunk that contains a
TP all-reduce or an MoE all-to-all also contains the time spent waiting for slower peers, which must
not be stretched (it would slow a simulated device further for waiting, biasing every pipeline and
heterogeneous measurement). CommGroup adds each collective's time here; `pipeline.compute_timer`
subtracts what accrued during the chunk. Per thread, because each rank's compute runs on one thread.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

_local = threading.local()


def total() -> float:
    """Seconds this thread has spent in collectives so far."""
    return getattr(_local, "seconds", 0.0)


@contextmanager
def waiting():
    """Count the time inside the block as waiting in a collective (nested blocks count once)."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    start = time.perf_counter()
    try:
        yield
    finally:
        _local.depth = depth
        if depth == 0:
            _local.seconds = total() + (time.perf_counter() - start)
