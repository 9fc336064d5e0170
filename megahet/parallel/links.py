"""Point-to-point links between any two ranks: native inside a communication domain, bridged across.

A mixed pipeline or a mixed reduction should not send every message through the host because one
member sits in another domain: only the cross-domain hops need the bridge. `Links` holds one native
process group per domain (for messages between two ranks of that domain) and one gloo group over the
whole world (for messages that cross domains, staged through host memory). Every byte is counted, so
tests can assert that the bridge is taken across domains and never inside one.

`exchange(sends, recvs)` posts all of a step's sends and receives together (batched isend/irecv on
native libraries), so a transport whose sends block until the matching receive is posted
(NCCL/HCCL rendezvous) cannot deadlock on the order of messages inside one exchange.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megahet.parallel.collective_errors import wait_all



@dataclass
class LinkCounters:
    """Bytes and messages sent by this rank, split by link kind (native vs bridged)."""
    native_bytes: int = 0
    bridge_bytes: int = 0
    native_messages: int = 0
    bridge_messages: int = 0
    bridge_s: float = 0.0  # time spent waiting on exchanges that crossed domains
    by_peer: Dict[int, int] = field(default_factory=dict)

    def add(self, peer: int, nbytes: int, bridged: bool) -> None:
        if bridged:
            self.bridge_bytes += nbytes
            self.bridge_messages += 1
        else:
            self.native_bytes += nbytes
            self.native_messages += 1
        self.by_peer[peer] = self.by_peer.get(peer, 0) + nbytes

    def as_dict(self) -> dict:
        return {"native_bytes": self.native_bytes, "bridge_bytes": self.bridge_bytes,
                "native_messages": self.native_messages, "bridge_messages": self.bridge_messages}


@dataclass
class Send:
    tensor: torch.Tensor
    dst: int  # global rank
    tag: int = 0


@dataclass
class Recv:
    shape: Tuple[int, ...]
    dtype: torch.dtype
    src: int  # global rank
    tag: int = 0


class Links:
    """Per-link transport for one rank. Every rank must construct it, in the same order as the others.

    Args:
        my_rank: this process's global rank.
        domains: communication domain of every global rank.
        libraries: collective library of every global rank (gloo, nccl, hccl).
        device: this rank's compute device (received tensors land there).
        timeout: process-group timeout.
        counters: where sent bytes are counted (shared with the context's other groups).
        throttle: a link_throttle.SiteThrottle for simulated sites (messages between sites take the
            link's latency + bytes / bandwidth), or None.
    """

    def __init__(self, my_rank: int, domains: Sequence[str], libraries: Sequence[str], device: torch.device,
                 timeout, counters: Optional[LinkCounters] = None, throttle=None):
        self.rank, self.domains, self.device = my_rank, list(domains), device
        self.throttle = throttle
        self.counters = counters if counters is not None else LinkCounters()
        self.progress = None  # heartbeat.Progress (set by the context): names hung peers in errors
        self.world_size = len(self.domains)
        order = list(dict.fromkeys(self.domains))  # domains in first-rank order: the same on every rank
        self.multi_domain = len(order) > 1
        self._native: Dict[str, object] = {}
        self._library: Dict[str, str] = {}
        if not dist.is_initialized() or self.world_size == 1:
            return
        for d in order:
            members = [r for r, x in enumerate(self.domains) if x == d]
            lib = libraries[members[0]]
            self._library[d] = lib
            if not self.multi_domain:
                self._native[d] = None  # the default group already is this domain's native group
            elif len(members) > 1:
                pg = dist.new_group(ranks=members, backend=lib, timeout=timeout)
                self._native[d] = pg
        # Cross-domain messages go host -> gloo -> host on a group of their own.
        self._bridge_pg = dist.new_group(ranks=list(range(self.world_size)), backend="gloo",
                                         timeout=timeout) if self.multi_domain else None
        # NCCL/HCCL set up a group's communicator in its first collective, which every member must
        # join; batched point-to-point between a subset of members is only allowed after that.
        mine = self._native.get(self.domains[self.rank], False)
        if mine is not False and self._library[self.domains[self.rank]] != "gloo":
            dist.all_reduce(torch.zeros(1, device=device), group=mine)

    def bridged(self, peer: int) -> bool:
        """True when messages to `peer` cross communication domains (host-staged)."""
        return self.domains[peer] != self.domains[self.rank]

    def _pg(self, peer: int):
        return self._bridge_pg if self.bridged(peer) else self._native.get(self.domains[self.rank])

    def _wire(self, peer: int) -> torch.device:
        """Where a message to/from `peer` lives: host for the bridge and gloo, the device otherwise."""
        if self.bridged(peer) or self._library.get(self.domains[self.rank], "gloo") == "gloo":
            return torch.device("cpu")
        return self.device

    def exchange(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> List[torch.Tensor]:
        """Post every send and receive at once, wait for all; return the received tensors (on `device`).

        Inside one exchange at most one message per (peer, direction, tag) is allowed.
        """
        start = time.perf_counter()
        handle, outs = self.post(sends, recvs)
        handle.wait()
        if any(self.bridged(s.dst) for s in sends) or any(self.bridged(r.src) for r in recvs):
            self.counters.bridge_s += time.perf_counter() - start
        return [self.arrive(buf) for buf in outs]

    def post(self, sends: Sequence[Send], recvs: Sequence[Recv]):
        """Start sends and receives without waiting: (handle with wait()/is_completed(), receive buffers).

        Pass each buffer through `arrive` after `handle.wait()` to get it on the compute device.
        """
        ops, keep, outs = [], [], []
        for s in sends:
            wire = s.tensor.detach().to(self._wire(s.dst)).contiguous()  # host for the bridge and gloo
            keep.append(wire)
            self.counters.add(s.dst, wire.numel() * wire.element_size(), self.bridged(s.dst))
            ops.append(("send", wire, s.dst, s.tag))
        for r in recvs:
            buf = torch.empty(r.shape, dtype=r.dtype, device=self._wire(r.src))
            outs.append(buf)
            ops.append(("recv", buf, r.src, r.tag))
        works = self._post(ops)
        receipt = self.throttle.post(self._bridge_pg, [(s.dst, 0, s.tag) for s in sends],
                                     [(r.src, b.numel() * b.element_size(), r.tag) for r, b in zip(recvs, outs)]
                                     ) if self.throttle is not None else None
        peers = sorted({s.dst for s in sends} | {r.src for r in recvs})
        return _Handle(works, keep, receipt, f"rank {self.rank}: point-to-point exchange with ranks {peers}",
                       self.progress, peers), outs

    def post_host(self, sends: Sequence[Send], recvs: Sequence[Recv]):
        """Small host-tensor messages (pipeline shape headers) over gloo, never through a device
        library: the cross-domain gloo group, or the default group's gloo side in a one-domain job.
        Returns (handle, receive buffers) like `post`; not counted as link traffic."""
        pg = self._bridge_pg  # None: the default group, whose host tensors travel through gloo
        works = [dist.isend(s.tensor.cpu(), dst=s.dst, group=pg, tag=s.tag) for s in sends]
        outs = [torch.empty(r.shape, dtype=r.dtype, device="cpu") for r in recvs]
        works += [dist.irecv(b, src=r.src, group=pg, tag=r.tag) for b, r in zip(outs, recvs)]
        peers = sorted({s.dst for s in sends} | {r.src for r in recvs})
        return _Handle(works, [s.tensor for s in sends], None, f"rank {self.rank}: point-to-point header exchange "
                       f"with ranks {peers}", self.progress, peers), outs

    def exchange_host(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> List[torch.Tensor]:
        """`post_host` and wait: the received host tensors."""
        handle, outs = self.post_host(sends, recvs)
        handle.wait()
        return outs

    def arrive(self, buf: torch.Tensor) -> torch.Tensor:
        """A received buffer on the compute device (checked after the host round trip)."""
        out = buf if buf.device == self.device else buf.to(self.device)
        assert out.device == self.device, f"link message landed on {out.device}, expected {self.device}"
        return out

    def _post(self, ops):
        """isend/irecv on gloo; one batch_isend_irecv per native group (rendezvous-safe)."""
        works, batches = [], {}
        for kind, t, peer, tag in ops:
            pg = self._pg(peer)
            native = not self.bridged(peer) and self._library.get(self.domains[self.rank], "gloo") != "gloo"
            if native:
                fn = dist.isend if kind == "send" else dist.irecv
                batches.setdefault(id(pg), (pg, []))[1].append(dist.P2POp(fn, t, peer, pg, tag))
            elif kind == "send":
                works.append(dist.isend(t, dst=peer, group=pg, tag=tag))
            else:
                works.append(dist.irecv(t, src=peer, group=pg, tag=tag))
        for _, (pg, p2p_ops) in batches.items():
            works.extend(dist.batch_isend_irecv(p2p_ops))
        return works


class _Handle:
    """Works of one post; keeps the staged send buffers alive until they complete. A hung or dead peer
    makes `wait` raise the one-line error naming `what` and the peers' states (collective_errors)."""

    def __init__(self, works, keep, receipt=None, what: str = "point-to-point exchange", progress=None, peers=()):
        self._works, self._keep, self._receipt = works, keep, receipt
        self._what, self._progress, self._peers = what, progress, list(peers)

    def wait(self):
        wait_all(self._works, self._what, self._progress, self._peers)
        if self._receipt is not None:  # simulated sites: wait out the link's time
            self._receipt.finish()
        self._works, self._keep, self._receipt = [], None, None

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)
