"""Make a host-staged transfer take as long as it would over a slower link (simulated sites).

The sim backend makes compute slower by sleeping after each chunk; this does the same for messages:
a message between two ranks on different simulated sites arrives `latency + bytes / bandwidth` after
its sender posted it (a buffered send, as the planner's simulator assumes: the sender goes on, the
receiver waits). Each throttled message is followed by a one-number stamp with the sender's post time
(wall clock, the same on every process of one machine); the receiver, once the transfer is done,
sleeps until the latest arrival. Links are given per direction in the cluster spec (`links.cross_site`
GB/s, `links.cross_site_latency_ms`), so one CPU machine can run and measure a two-site plan.
Links (pipeline messages) and HierarchicalGroup (the cross-part shard exchange of a reduction) call
it; both split the topology by (domain, site) (`context.topology_parts`), so every message between
sites crosses the bridge. The world group's blocking all-reduces (the job-wide scalars: loss, gradient
norm) wait out a latency-bound tree over the link after they complete (`scalar_collective_delay`, the
cost model's charge for them). TP/EP groups, which the planner never places across sites, are not
throttled.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megahet.errors import MegahetError

def stamp_tag(tag: int) -> int:
    """Tag of the stamp that travels beside a message with `tag`. Data tags on a bridged group are
    1 mod 4 (pipeline data, boundary.data_tag) or 0 (gradient and shard exchanges), headers 0 mod 4,
    so tag + 2 (2 or 3 mod 4) never meets another message and stays within 31 bits."""
    return tag + 2


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


def cluster_throttles(cluster) -> Optional[List[List[Optional[LinkThrottle]]]]:
    """The throttle table of a cluster spec whose groups sit on several sites joined by
    `links.cross_site`; None when nothing is throttled."""
    sites = rank_sites(cluster)
    if len({s or "" for s in sites}) < 2 or not cluster.links.get("cross_site"):
        return None
    return site_throttles(sites, cluster.links)


def scalar_collective_delay(table: Sequence[Sequence[Optional[LinkThrottle]]],
                            world: int) -> Optional[Callable[[int], float]]:
    """Seconds (a function of the bytes) a blocking all-reduce over `world` ranks spanning simulated sites
    spends on the site link once every rank has arrived: a tree up and down, 2 ceil(log2 world) messages
    (cost_model.small_allreduce_time, what the planner charges a step's scalar all-reduces on a
    cross-site world). None when no pair of ranks is throttled."""
    link = next((x for row in table for x in row if x is not None), None)
    if link is None or world < 2:
        return None
    steps = 2 * math.ceil(math.log2(world))
    return lambda nbytes: steps * link.duration(nbytes)


def arrival_wait(received: Sequence[Tuple[int, LinkThrottle, int, float]], now: float) -> float:
    """Seconds to wait so that every message has arrived: `received` holds (sender, link, bytes, the
    sender's post time) per throttled message; one sender's messages share its link (bytes add up)."""
    by_sender: Dict[int, Tuple[LinkThrottle, int, float]] = {}
    for peer, link, nbytes, stamp in received:
        _, total, first = by_sender.get(peer, (link, 0, stamp))
        by_sender[peer] = (link, total + nbytes, min(first, stamp))
    arrival = max((start + link.duration(n) for link, n, start in by_sender.values()), default=now)
    return max(0.0, arrival - now)


class SiteThrottle:
    """One rank's view of the throttle table: stamps its throttled sends, delays its throttled receives.

    table[src][dst] is the LinkThrottle between two global ranks, or None (same site / no link).
    """

    def __init__(self, rank: int, table: Sequence[Sequence[Optional[LinkThrottle]]], clock=time.time,
                 sleep=time.sleep):
        self.rank, self.table, self.clock, self.sleep = rank, table, clock, sleep
        self.waited_s = 0.0  # total seconds slept for link time (for logs and tests)

    def link(self, src: int, dst: int) -> Optional[LinkThrottle]:
        return self.table[src][dst]

    def any(self) -> bool:
        return any(x is not None for row in self.table for x in row)

    def post(self, pg, sends: Sequence[Tuple[int, int, int]], recvs: Sequence[Tuple[int, int, int]]):
        """Post stamps for (peer, bytes, tag) sends and receives on gloo group `pg` (None: the default
        group); returns the pending receipt whose `finish()` waits out the link time, or None."""
        now = self.clock()
        works, got = [], []
        for peer, _, tag in sends:
            if self.link(self.rank, peer) is not None:
                stamp = torch.tensor([now], dtype=torch.float64)  # [1] sender's post time
                works.append((dist.isend(stamp, dst=peer, group=pg, tag=stamp_tag(tag)), stamp))
        for peer, nbytes, tag in recvs:
            link = self.link(peer, self.rank)
            if link is not None:
                buf = torch.empty(1, dtype=torch.float64)  # [1] the sender's post time
                works.append((dist.irecv(buf, src=peer, group=pg, tag=stamp_tag(tag)), buf))
                got.append((peer, link, nbytes, buf))
        return _Receipt(self, works, got) if works else None


class _Receipt:
    """Stamps of one exchange; `finish()` after the data transfer completes."""

    def __init__(self, owner: SiteThrottle, works, got):
        self.owner, self.works, self.got = owner, works, got

    def finish(self) -> float:
        for work, _ in self.works:
            work.wait()
        wait = arrival_wait([(p, link, n, float(buf[0])) for p, link, n, buf in self.got], self.owner.clock())
        if wait > 0:
            self.owner.sleep(wait)
            self.owner.waited_s += wait
        return wait
