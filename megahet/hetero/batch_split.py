"""Split a global batch over data-parallel replicas so that the slowest one finishes earliest.

One exact search, shared by the planner (`planner.finer_split`: per-pipeline micro-batch sizes) and the
runtime's `--rebalance` (`training/rebalance.best_split` with mixed micro-batch sizes): the smallest time
T for which some choice of per-replica sample counts, each replica done by T, sums to the batch. Sums
reachable by the first i replicas are kept as a bitset (a Python int), T is searched over the finite
times by bisection.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence


def min_max_split(times: Sequence[Sequence[float]], total: int) -> Optional[List[int]]:
    """Samples per replica summing to `total`, at least one each, minimising the slowest replica's time.

    times[i][s]: replica i's time for s samples, for s = 0..total (math.inf where s is not allowed,
    e.g. not a whole number of its micro-batches; s = 0 is never chosen). None when no split exists.
    """
    levels = sorted({t for row in times for t in row[1:total + 1] if t < math.inf})
    if not levels or _split_within(levels[-1], times, total) is None:
        return None
    lo, hi = 0, len(levels) - 1
    while lo < hi:  # the smallest feasible level
        mid = (lo + hi) // 2
        if _split_within(levels[mid], times, total) is None:
            lo = mid + 1
        else:
            hi = mid
    return _split_within(levels[lo], times, total)


def _split_within(limit: float, times: Sequence[Sequence[float]], total: int) -> Optional[List[int]]:
    """Samples per replica summing to `total`, each replica's time <= `limit`, or None."""
    mask = (1 << (total + 1)) - 1
    reach = [1]  # reach[i]: bitset of the sample totals the first i replicas can take
    for row in times:
        r = 0
        for s in range(1, total + 1):
            if row[s] <= limit:
                r |= reach[-1] << s
        reach.append(r & mask)
    if not (reach[-1] >> total) & 1:
        return None
    out, left = [0] * len(times), total
    for i in range(len(times) - 1, -1, -1):  # walk back: the most samples whose remainder was reachable
        s = next(s for s in range(left, 0, -1) if times[i][s] <= limit and (reach[i] >> (left - s)) & 1)
        out[i], left = s, left - s
    return out
