"""Event simulation of one pipeline's step on the schedule the executor actually runs.

The action lists come from ``megahet.parallel.schedules.build_schedule`` (the same lists
``schedule_executor`` runs), so bubbles, uneven stages, interleaving and warm-up are whatever the real
schedule does. Each rank executes its list in order: compute takes its predicted time, a send is
buffered (the message arrives after the link's transfer time), a receive waits for its message.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megahet.errors import MegahetError
from megahet.parallel.schedules import Action, build_schedule

_SENDS = {"send_fwd": "fwd", "send_bwd": "bwd"}
_RECVS = {"recv_fwd": "fwd", "recv_bwd": "bwd"}


def schedule_name(pp: int, microbatches: int, chunks: int) -> str:
    """The schedule megahet picks for --pipeline-schedule auto (pipeline.py's rule)."""
    if chunks > 1:
        return "interleaved"
    return "1f1b" if microbatches >= pp else "afab"


@dataclass
class PipelineResult:
    """Simulated step of one pipeline: makespan, per-rank finish and busy seconds, the timeline."""
    time: float
    finish: List[float]
    busy: List[float]
    timeline: List[List[Tuple[Action, float, float]]]

    @property
    def bubble(self) -> float:
        """Idle share of the slowest rank's span."""
        return 1.0 - max(self.busy) / self.time if self.time > 0 else 0.0


def simulate_pipeline(actions: Sequence[Sequence[Action]], fwd: Callable[[int, int, int], float],
                      bwd: Callable[[int, int, int], float],
                      transfer: Optional[Callable[[int, int, str], float]] = None) -> PipelineResult:
    """Run every rank's action list.

    Args:
        actions: one list per pipeline rank (build_schedule's output).
        fwd, bwd: (rank, chunk, microbatch) -> seconds of that compute.
        transfer: (src rank, dst rank, "fwd"|"bwd") -> seconds a message takes (0 when None).
    """
    n = len(actions)
    pos, clock, busy = [0] * n, [0.0] * n, [0.0] * n
    box: Dict[tuple, deque] = {}
    timeline: List[List[Tuple[Action, float, float]]] = [[] for _ in range(n)]
    pending = set(range(n))
    while pending:
        progress = False
        for rank in list(pending):
            acts = actions[rank]
            while pos[rank] < len(acts):
                a = acts[pos[rank]]
                if a.op in _SENDS:
                    d = _SENDS[a.op]
                    delay = transfer(rank, a.peer, d) if transfer else 0.0
                    box.setdefault((rank, a.peer, d, a.peer_chunk, a.microbatch), deque()).append(clock[rank] + delay)
                elif a.op in _RECVS:
                    q = box.get((a.peer, rank, _RECVS[a.op], a.chunk, a.microbatch))
                    if not q:
                        break
                    clock[rank] = max(clock[rank], q.popleft())
                else:
                    dt = (fwd if a.op == "fwd" else bwd)(rank, a.chunk, a.microbatch)
                    timeline[rank].append((a, clock[rank], clock[rank] + dt))
                    clock[rank] += dt
                    busy[rank] += dt
                pos[rank] += 1
                progress = True
            if pos[rank] == len(acts):
                pending.discard(rank)
        if pending and not progress:
            raise MegahetError("simulated pipeline schedule deadlocks; the schedule's action lists are inconsistent")
    return PipelineResult(max(clock) if clock else 0.0, clock, busy, timeline)


def inflight_peak(actions: Sequence[Action], chunk_weight: Sequence[float]) -> float:
    """Peak of sum(chunk_weight[c] x micro-batches of chunk c forwarded but not yet backwarded).

    With weights = activation bytes per micro-batch of each chunk this is the rank's activation peak
    under the schedule; with weights of 1 it is the number of micro-batches in flight.
    """
    live, peak = 0.0, 0.0
    for a in actions:
        if a.op == "fwd":
            live += chunk_weight[a.chunk]
            peak = max(peak, live)
        elif a.op == "bwd":
            live -= chunk_weight[a.chunk]
    return peak


@lru_cache(maxsize=256)
def pipeline_schedule(pp: int, microbatches: int, chunks: int) -> List[List[Action]]:
    """Action lists for a pipeline of `pp` stages (cached: a search asks for the same shapes often)."""
    return build_schedule(schedule_name(pp, microbatches, chunks), pp, microbatches, chunks)
