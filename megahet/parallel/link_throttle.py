"""Make a host-staged transfer take as long as it would over a slower link (simulated sites).

The sim backend makes compute slower by sleeping after each chunk; this does the same for messages:
after a transfer between two ranks on different simulated sites completes, the receiver waits until
`latency + bytes / bandwidth` has passed since the transfer began. Links are given per direction in
the cluster spec (`links.cross_site` GB/s, `links.cross_site_latency_ms`), so one CPU machine can
run and measure a two-site plan.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

from megahet.errors import MegahetError


@dataclass(frozen=True)
class LinkThrottle:
    """A link of `bandwidth` bytes/s per direction and `latency` seconds per message."""
    bandwidth: float
    latency: float

    def __post_init__(self):
        if self.bandwidth <= 0 or self.latency < 0:
            raise MegahetError(f"link throttle needs bandwidth > 0 and latency >= 0, got {self.bandwidth}, "
                               f"{self.latency}; fix links.cross_site / cross_site_latency_ms")

    def duration(self, nbytes: int) -> float:
        """Seconds a message of `nbytes` takes on this link."""
        return self.latency + nbytes / self.bandwidth

    def finish(self, nbytes: int, started: float, clock=time.perf_counter, sleep=time.sleep) -> float:
        """Wait until the message would have arrived; returns the seconds waited."""
        wait = started + self.duration(nbytes) - clock()
        if wait > 0:
            sleep(wait)
            return wait
        return 0.0


def site_throttles(rank_sites: Sequence[Optional[str]], links: dict) -> List[List[Optional[LinkThrottle]]]:
    """throttle[src][dst] for every rank pair on different sites (None inside a site or without a
    `cross_site` link in the spec)."""
    bw = links.get("cross_site")
    n = len(rank_sites)
    if not bw:
        return [[None] * n for _ in range(n)]
    link = LinkThrottle(float(bw) * 1e9, float(links.get("cross_site_latency_ms", 0.0)) / 1e3)
    return [[link if (a or "") != (b or "") else None for b in rank_sites] for a in rank_sites]


def rank_sites(cluster) -> List[Optional[str]]:
    """The site of every global rank, in cluster spec order."""
    return [g.site for g in cluster.groups for _ in range(g.devices)]
