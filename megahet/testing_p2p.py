"""An in-process pipeline transport with NCCL/HCCL semantics, for testing schedules and executors.

Real accelerator libraries buffer nothing: a send completes only when the peer has posted the matching
receive, and messages between two ranks are matched in posting order (tags are ignored). gloo buffers
and matches by tag, so a wrong order that hangs an 8-GPU job passes a gloo test. ``RendezvousNetwork``
gives each rank (a thread) an endpoint with exactly the strict semantics of the pipeline transport
(``megahet.parallel.boundary.StageP2P``) over NCCL: a batch's shape headers go first and never block; its data sends and receives are posted
together once every incoming header has arrived (the receiver needs the shape), and every operation
waits until its counterpart is posted. A matched pair whose tags differ is an error (on NCCL it would
silently deliver the wrong tensor), and a batch left unmatched for ``timeout`` seconds fails every
rank with a message naming what each rank waits on (a deadlock).

Endpoints offer the batched ``exchange(sends, recvs)`` that ``schedule_executor`` uses and, for older
callers or hand-written tests, a blocking ``isend`` and ``recv``. Stage boundaries of any shape
(uneven stages, different TP degrees on both sides) need nothing special: payloads are tensors.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Sequence

import torch

__all__ = ["RendezvousNetwork", "RendezvousP2P", "RendezvousError"]


class RendezvousError(RuntimeError):
    """A batch never matched (deadlock) or matched the wrong message."""


class _Done:
    def wait(self):
        return None

    def is_completed(self):
        return True


class RendezvousNetwork:
    """Links between ``size`` thread-ranks; ``endpoint(rank)`` is what one rank talks through.

    ``log`` lists every delivered message as (src, dst, tag), in delivery order.
    """

    def __init__(self, size: int, timeout: float = 10.0):
        self.size, self.timeout = size, timeout
        self._cond = threading.Condition()
        # (src, dst) -> posted sends [(tag, payload)] and posted receives [tag], in posting order.
        self._sends: dict[tuple[int, int], list] = defaultdict(list)
        self._recvs: dict[tuple[int, int], list] = defaultdict(list)
        self._waiting: dict[int, str] = {}
        self._failure: str | None = None
        self.log: list[tuple[int, int, int]] = []

    def endpoint(self, rank: int) -> "RendezvousP2P":
        return RendezvousP2P(self, rank)

    def unmatched(self) -> list[str]:
        """Posted operations that never found a counterpart (should be empty after a run)."""
        out = []
        for link in sorted(set(self._sends) | set(self._recvs)):
            s, r = len(self._sends[link]), len(self._recvs[link])
            if s != r:
                out.append(f"{link[0]}->{link[1]}: {s} sends, {r} receives")
        return out

    def _exchange(self, rank: int, sends, recvs) -> list[torch.Tensor]:
        """Post like ``StageP2P``: headers first (never blocking), then the data sends and receives
        together once every incoming header has arrived; wait for the whole batch."""
        with self._cond:
            if self._failure:
                raise RendezvousError(self._failure)
            mine = []  # (link, index, tag, is_send)
            entries = []  # this batch's [tag, payload, posted] sends and [tag, posted] receives
            for tensor, peer, tag in sends:
                queue = self._sends[(rank, peer)]
                mine.append(((rank, peer), len(queue), tag, True))
                entries.append([tag, tensor.detach().clone(), False])  # header visible, data not yet posted
                queue.append(entries[-1])
            for peer, tag in recvs:
                queue = self._recvs[(peer, rank)]
                mine.append(((peer, rank), len(queue), tag, False))
                entries.append([tag, False])  # posted once every incoming header is in
                queue.append(entries[-1])
            self._cond.notify_all()
            incoming = [(link, i) for link, i, _, is_send in mine if not is_send]
            self._wait(rank, mine, lambda: all(len(self._sends[link]) > i for link, i in incoming), "headers")
            for entry in entries:
                entry[-1] = True  # the data batch: sends and receives posted together
            self._cond.notify_all()
            self._wait(rank, mine, lambda: all(
                len(queue[link]) > i and queue[link][i][-1]
                for link, i, _, is_send in mine for queue in [self._recvs if is_send else self._sends]), "batch")
            received = []
            for link, i, tag, is_send in mine:
                other = self._recvs[link][i][0] if is_send else self._sends[link][i][0]
                if other != tag:
                    self._failure = (f"message {i} from rank {link[0]} to rank {link[1]} was sent with tag "
                                     f"{tag if is_send else other} but received as tag {other if is_send else tag}: "
                                     f"an order-matching library (NCCL, HCCL) would deliver the wrong tensor")
                    self._cond.notify_all()
                    raise RendezvousError(self._failure)
                if not is_send:
                    received.append(self._sends[link][i][1])
                    self.log.append((link[0], link[1], tag))
            return received

    def _wait(self, rank, mine, done, phase) -> None:
        """Block (holding the condition) until ``done()``; on timeout fail every rank (a deadlock)."""
        self._waiting[rank] = f"{phase} of " + " ".join(
            f"{'send' if is_send else 'recv'}(tag {tag}, {link[0]}->{link[1]})" for link, _, tag, is_send in mine)
        deadline = time.monotonic() + self.timeout
        while self._failure is None and not done():
            left = deadline - time.monotonic()
            if left <= 0:
                stuck = "; ".join(f"rank {r} waits on {what}" for r, what in sorted(self._waiting.items()))
                self._failure = f"no progress for {self.timeout}s under rendezvous sends (deadlock): {stuck}"
                self._cond.notify_all()
                break
            self._cond.wait(left)
        del self._waiting[rank]
        if self._failure:
            raise RendezvousError(self._failure)


class RendezvousP2P:
    """One rank's endpoint; peers are named by the same index space as the network's ranks."""

    def __init__(self, network: RendezvousNetwork, rank: int):
        self.network, self.rank = network, rank

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int, int]],
                 recvs: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Post ``sends`` [(tensor, peer, tag)] and ``recvs`` [(peer, tag)] together; wait for all."""
        return self.network._exchange(self.rank, list(sends), list(recvs))

    def isend(self, tensor: torch.Tensor, peer: int, tag: int):
        """Blocking, like a send on NCCL that nobody receives yet: returns once the receive is posted."""
        self.exchange([(tensor, peer, tag)], [])
        return _Done()

    def recv(self, peer: int, tag: int) -> torch.Tensor:
        return self.exchange([], [(peer, tag)])[0]
