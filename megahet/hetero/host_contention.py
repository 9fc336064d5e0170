"""Ranks that share one host's cores slow each other down by how many of them compute at the same moment.

A profile measured alone gives a chunk's time on an idle host; `contention` (profile.load_or_measure_contention)
gives s(k), that time's multiple while k ranks of the host compute at once. Which k a chunk meets is a
property of the plan's timeline: a sim rank idles between its chunks, a pipeline rank waits for its peer,
a data-parallel replica with fewer micro-batches finishes first and leaves the host to the others. So
the predictor simulates, takes each chunk's mean s(k(t)) over the time it computes, stretches the chunk
by it and simulates again, until the timeline settles (`mean_slowdowns` is one such pass).
"""
from __future__ import annotations

import bisect
import math
from typing import Dict, Hashable, List, Sequence, Tuple


def slowdown(curve: Sequence[float], k: float) -> float:
    """s(k) from the measured curve [s(1), s(2), ...]: interpolated between whole counts, and beyond the
    measured counts in proportion to k (the cores are shared out evenly)."""
    if k <= 1.0 or len(curve) < 2:
        return 1.0
    n = len(curve)
    if k >= n:
        return curve[-1] * k / n
    lo = int(math.floor(k))
    frac = k - lo
    return curve[lo - 1] + (curve[lo] - curve[lo - 1]) * frac


def mean_slowdowns(busy: Sequence[Tuple[Hashable, float, float, float]],
                   curve: Sequence[float]) -> Dict[Hashable, float]:
    """For each busy interval (key, start, length, ranks), the mean of s(k(t)) over it, where k(t) is the
    number of ranks computing at t (the sum of `ranks` over the intervals covering t, its own included).

    `ranks` > 1 stands for several identical ranks in one interval (a TP stage's ranks, identical
    data-parallel replicas simulated once)."""
    events: Dict[float, float] = {}
    for _, start, length, ranks in busy:
        if length <= 0:
            continue
        events[start] = events.get(start, 0.0) + ranks
        events[start + length] = events.get(start + length, 0.0) - ranks
    times = sorted(events)
    # integral[i]: the integral of s(k(t)) from times[0] to times[i]
    integral: List[float] = [0.0]
    k = 0.0
    for a, b in zip(times, times[1:]):
        k += events[a]
        integral.append(integral[-1] + slowdown(curve, round(k, 9)) * (b - a))
    out: Dict[Hashable, float] = {}
    for key, start, length, _ in busy:
        if length <= 0:
            out[key] = 1.0
            continue
        i = bisect.bisect_left(times, start)
        j = bisect.bisect_left(times, start + length)
        out[key] = (integral[j] - integral[i]) / length
    return out
