"""Pipeline schedules as data: per-rank lists of actions that can be printed, checked and drawn.

A schedule is ``list[list[Action]]`` indexed by pipeline rank. Model chunk ``c`` of rank ``r`` is virtual
stage ``c * pp + r`` (see ``pipeline_layout``): its forward output goes to rank ``r + 1`` chunk ``c``,
except that rank ``pp - 1`` sends to rank 0 chunk ``c + 1``; gradients flow back the same way.
Receives are placed right before the compute that needs them and sends right after the compute that
produced them; sends are assumed non-blocking (buffered), receives blocking. ``validate_schedule``
checks a schedule under exactly those rules, so custom schedules can be tested without processes.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

from megahet.errors import MegahetError
from megahet.parallel.pipeline_layout import check_positive

__all__ = ["Action", "OPS", "all_forward_all_backward", "one_f_one_b", "interleaved_one_f_one_b",
           "build_schedule", "SCHEDULES", "format_schedule", "validate_schedule", "simulate_schedule"]

OPS = ("recv_fwd", "fwd", "send_fwd", "recv_bwd", "bwd", "send_bwd")
_SHORT = {"recv_fwd": "RF", "fwd": "F", "send_fwd": "SF", "recv_bwd": "RB", "bwd": "B", "send_bwd": "SB"}
_SENDS = {"send_fwd": "fwd", "send_bwd": "bwd"}
_RECVS = {"recv_fwd": "fwd", "recv_bwd": "bwd"}


@dataclass(frozen=True)
class Action:
    """One step of one rank.

    ``chunk`` is always the local model chunk the action concerns (for a send: the chunk that produced
    the tensor; for a receive: the chunk that will consume it). ``peer`` is the pp rank sent to or
    received from, and ``peer_chunk`` the model chunk on that peer; both are None for fwd/bwd.
    ``peer_chunk`` lets the executor derive a message tag from the receiver's chunk on both sides.
    """

    op: str
    chunk: int
    microbatch: int
    peer: int | None = None
    peer_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise MegahetError(f"unknown pipeline action {self.op!r}; use one of {', '.join(OPS)}")
        is_comm = self.op not in ("fwd", "bwd")
        if (self.peer is not None) != is_comm or (self.peer_chunk is not None) != is_comm:
            raise MegahetError(f"pipeline action {self.op}: set peer and peer_chunk for send/recv ops only")

    @property
    def is_compute(self) -> bool:
        return self.op in ("fwd", "bwd")

    def __str__(self) -> str:
        text = f"{_SHORT[self.op]}{self.microbatch}c{self.chunk}"
        if self.op in _SENDS:
            return f"{text}>{self.peer}"
        if self.op in _RECVS:
            return f"{text}<{self.peer}"
        return text


def _next_stage(rank: int, chunk: int, pp: int, chunks: int) -> tuple[int, int] | None:
    """(rank, chunk) that consumes this chunk's forward output; None after the last virtual stage."""
    if rank < pp - 1:
        return rank + 1, chunk
    return (0, chunk + 1) if chunk < chunks - 1 else None


def _prev_stage(rank: int, chunk: int, pp: int, chunks: int) -> tuple[int, int] | None:
    """(rank, chunk) whose forward output this chunk consumes; None for the first virtual stage."""
    if rank > 0:
        return rank - 1, chunk
    return (pp - 1, chunk - 1) if chunk > 0 else None


def _with_comm(rank: int, compute: list[tuple[str, int, int]], pp: int, chunks: int) -> list[Action]:
    """Wrap each compute step in the receive it needs and the send it feeds."""
    actions: list[Action] = []
    for op, chunk, mb in compute:
        prev, nxt = _prev_stage(rank, chunk, pp, chunks), _next_stage(rank, chunk, pp, chunks)
        if op == "fwd":
            if prev:
                actions.append(Action("recv_fwd", chunk, mb, *prev))
            actions.append(Action("fwd", chunk, mb))
            if nxt:
                actions.append(Action("send_fwd", chunk, mb, *nxt))
        else:
            if nxt:
                actions.append(Action("recv_bwd", chunk, mb, *nxt))
            actions.append(Action("bwd", chunk, mb))
            if prev:
                actions.append(Action("send_bwd", chunk, mb, *prev))
    return actions


def _check_sizes(pp_size: int, num_microbatches: int, num_chunks: int) -> None:
    check_positive(pp_size, "--pipeline-model-parallel-size")
    check_positive(num_chunks, "model chunks per rank")
    check_positive(num_microbatches, "micro-batches (--global-batch-size / --micro-batch-size)")


def _warmup_steady_drain(warmup: int, total: int, step: Callable[[int, str], tuple[str, int, int]]):
    """1F1B order of `total` virtual steps: `warmup` forwards, then one forward + one backward, then drain."""
    steady = total - warmup
    compute = [step(k, "fwd") for k in range(warmup)]
    for i in range(steady):
        compute += [step(warmup + i, "fwd"), step(i, "bwd")]
    return compute + [step(k, "bwd") for k in range(steady, total)]


def all_forward_all_backward(pp_size: int, num_microbatches: int, num_chunks: int = 1) -> list[list[Action]]:
    """GPipe order: every forward (chunk by chunk), then every backward in reverse chunk order.

    Simplest to reason about; keeps all micro-batches' activations alive at once.
    """
    _check_sizes(pp_size, num_microbatches, num_chunks)
    fwd = [("fwd", c, mb) for c in range(num_chunks) for mb in range(num_microbatches)]
    bwd = [("bwd", c, mb) for c in reversed(range(num_chunks)) for mb in range(num_microbatches)]
    return [_with_comm(r, fwd + bwd, pp_size, num_chunks) for r in range(pp_size)]


def one_f_one_b(pp_size: int, num_microbatches: int) -> list[list[Action]]:
    """Megatron's non-interleaved 1F1B: ``pp - rank - 1`` warm-up forwards, then alternate, then drain.

    At most ``pp - rank`` micro-batches are in flight on a rank, instead of all of them.
    """
    _check_sizes(pp_size, num_microbatches, 1)
    if num_microbatches < pp_size:
        raise MegahetError(f"1F1B needs at least as many micro-batches as pipeline stages: {num_microbatches} "
                           f"micro-batches (--global-batch-size / (--micro-batch-size x data-parallel size)) < "
                           f"--pipeline-model-parallel-size {pp_size}; raise --global-batch-size or lower "
                           f"--micro-batch-size")
    step = lambda mb, op: (op, 0, mb)  # noqa: E731
    return [_with_comm(rank, _warmup_steady_drain(pp_size - rank - 1, num_microbatches, step), pp_size, 1)
            for rank in range(pp_size)]


def interleaved_one_f_one_b(pp_size: int, num_microbatches: int, num_chunks: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B over ``num_chunks`` model chunks per rank.

    Virtual step ``k`` runs micro-batch group ``k // (pp * chunks)``; inside a group, ``pp`` consecutive
    micro-batches pass through one chunk before the next chunk (reversed chunk order for backward).
    Warm-up is ``(pp - rank - 1) * 2 + (chunks - 1) * pp`` forwards, capped at the total.
    The bubble shrinks by ``chunks`` at the cost of ``chunks`` times more P2P messages.
    """
    _check_sizes(pp_size, num_microbatches, num_chunks)
    if num_chunks > 1 and pp_size == 1:
        raise MegahetError("interleaved 1F1B needs --pipeline-model-parallel-size > 1; drop "
                           "--num-layers-per-virtual-pipeline-stage or use the 1f1b schedule")
    if num_microbatches % pp_size:
        raise MegahetError(f"interleaved 1F1B needs the number of micro-batches ({num_microbatches}) to be a "
                           f"multiple of --pipeline-model-parallel-size {pp_size}; adjust --global-batch-size "
                           f"or --micro-batch-size")
    total = num_microbatches * num_chunks
    group = pp_size * num_chunks

    def step(k: int, op: str) -> tuple[str, int, int]:
        chunk = (k % group) // pp_size
        if op == "bwd":
            chunk = num_chunks - 1 - chunk
        return op, chunk, (k // group) * pp_size + k % pp_size

    warmup = lambda rank: min((pp_size - rank - 1) * 2 + (num_chunks - 1) * pp_size, total)  # noqa: E731
    return [_with_comm(rank, _warmup_steady_drain(warmup(rank), total, step), pp_size, num_chunks)
            for rank in range(pp_size)]


SCHEDULES: dict[str, Callable[..., list[list[Action]]]] = {
    "afab": all_forward_all_backward, "1f1b": one_f_one_b, "interleaved": interleaved_one_f_one_b}


def build_schedule(name: str, pp_size: int, num_microbatches: int, num_chunks: int = 1) -> list[list[Action]]:
    """Schedule by name: ``afab``, ``1f1b`` or ``interleaved``; returns one action list per pp rank."""
    if name not in SCHEDULES:
        raise MegahetError(f"unknown pipeline schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if name == "1f1b":
        if num_chunks != 1:
            raise MegahetError(f"the 1f1b schedule runs one model chunk per rank, got {num_chunks}; use the "
                               f"interleaved schedule with --num-layers-per-virtual-pipeline-stage")
        return one_f_one_b(pp_size, num_microbatches)
    return SCHEDULES[name](pp_size, num_microbatches, num_chunks)


def simulate_schedule(actions_per_rank: list[list[Action]], *, fwd_time: float = 1.0,
                      bwd_time: float = 1.0) -> list[list[tuple[Action, float, float]]]:
    """Run all ranks' lists with buffered sends and blocking receives; comm takes no time.

    Returns, per rank, ``(action, start, end)`` of each fwd/bwd. Raises MegahetError if the ranks stall
    (a deadlock: every unfinished rank waits on a message nobody will send).
    """
    n = len(actions_per_rank)
    pos, clock = [0] * n, [0.0] * n
    mailbox: dict[tuple, deque] = {}
    timeline: list[list[tuple[Action, float, float]]] = [[] for _ in range(n)]
    while True:
        progress = False
        for rank, actions in enumerate(actions_per_rank):
            while pos[rank] < len(actions):
                a = actions[pos[rank]]
                if a.op in _SENDS:
                    mailbox.setdefault((rank, a.peer, _SENDS[a.op], a.peer_chunk, a.microbatch),
                                       deque()).append(clock[rank])
                elif a.op in _RECVS:
                    box = mailbox.get((a.peer, rank, _RECVS[a.op], a.chunk, a.microbatch))
                    if not box:
                        break
                    clock[rank] = max(clock[rank], box.popleft())
                else:
                    end = clock[rank] + (fwd_time if a.op == "fwd" else bwd_time)
                    timeline[rank].append((a, clock[rank], end))
                    clock[rank] = end
                pos[rank] += 1
                progress = True
        if all(pos[r] == len(actions_per_rank[r]) for r in range(n)):
            return timeline
        if not progress:
            stuck = "; ".join(f"rank {r} at {actions_per_rank[r][pos[r]]}" for r in range(n)
                              if pos[r] < len(actions_per_rank[r]))
            raise MegahetError(f"pipeline schedule deadlocks: {stuck}; fix the schedule's action order")


def validate_schedule(actions_per_rank: list[list[Action]], pp_size: int, num_chunks: int) -> None:
    """Raise MegahetError unless the schedule is complete, consistent and deadlock-free.

    Checks: every fwd and bwd of every (chunk, micro-batch) exactly once per rank, each bwd after its
    fwd; each rank's sends/receives are exactly those its stages need, to the right peers, receives
    before and sends after the compute; every send has its receive; a simulation finishes.
    """
    if len(actions_per_rank) != pp_size:
        raise MegahetError(f"schedule has {len(actions_per_rank)} rank lists for pipeline size {pp_size}")
    mbs = {a.microbatch for actions in actions_per_rank for a in actions}
    num_mb = max(mbs) + 1 if mbs else 0
    for rank, actions in enumerate(actions_per_rank):
        _check_rank(rank, actions, pp_size, num_chunks, num_mb)
    sends = Counter((r, a.peer, _SENDS[a.op], a.peer_chunk, a.microbatch)
                    for r, actions in enumerate(actions_per_rank) for a in actions if a.op in _SENDS)
    recvs = Counter((a.peer, r, _RECVS[a.op], a.chunk, a.microbatch)
                    for r, actions in enumerate(actions_per_rank) for a in actions if a.op in _RECVS)
    if sends != recvs:
        odd = next(iter((sends - recvs) or (recvs - sends)))
        raise MegahetError(f"schedule message (src, dst, dir, chunk, mb)={odd} has no matching send/recv")
    simulate_schedule(actions_per_rank)


def _check_rank(rank: int, actions: list[Action], pp: int, chunks: int, num_mb: int) -> None:
    where: dict[tuple[str, int, int], int] = {}
    for i, a in enumerate(actions):
        if not 0 <= a.chunk < chunks or (a.peer is not None and not 0 <= a.peer < pp):
            raise MegahetError(f"rank {rank}: action {a} names a chunk or peer outside the pipeline")
        key = (a.op, a.chunk, a.microbatch)
        if key in where:
            raise MegahetError(f"rank {rank}: action {a} appears more than once")
        where[key] = i
    expected = _with_comm(rank, [(op, c, mb) for op in ("fwd", "bwd") for c in range(chunks)
                                 for mb in range(num_mb)], pp, chunks)
    missing = set(expected) - set(actions)
    extra = set(actions) - set(expected)
    if missing or extra:
        bad = sorted(map(str, missing or extra))[0]
        raise MegahetError(f"rank {rank}: action {bad} is {'missing' if missing else 'unexpected'}")
    for c in range(chunks):
        for mb in range(num_mb):
            f, b = where[("fwd", c, mb)], where[("bwd", c, mb)]
            if b < f:
                raise MegahetError(f"rank {rank}: B{mb}c{c} comes before its forward")
            order = [where.get(("recv_fwd", c, mb), -1), f, where.get(("send_fwd", c, mb), len(actions)),
                     where.get(("recv_bwd", c, mb), -1), b, where.get(("send_bwd", c, mb), len(actions))]
            if order[0] > f or order[2] < f or order[3] > b or order[5] < b:
                raise MegahetError(f"rank {rank}: a receive of mb {mb} chunk {c} comes after its compute or a "
                                   f"send before it")


def format_schedule(actions_per_rank: list[list[Action]], *, aligned: bool = True) -> str:
    """Text grid, one row per rank.

    ``aligned``: compute actions only, placed in unit time slots by ``simulate_schedule`` so bubbles
    show as ``.``; otherwise every action of each rank in list order (comm included).
    """
    if not aligned:
        return "\n".join(f"rank {r}: " + " ".join(map(str, actions)) for r, actions in enumerate(actions_per_rank))
    timeline = simulate_schedule(actions_per_rank)
    slots = int(max((end for row in timeline for _, _, end in row), default=0))
    width = max((len(str(a)) for row in timeline for a, _, _ in row), default=1)
    rows = []
    for rank, row in enumerate(timeline):
        cells = ["."] * slots
        for a, start, _ in row:
            cells[int(start)] = str(a)
        rows.append(f"rank {rank} | " + " ".join(cell.ljust(width) for cell in cells).rstrip())
    return "\n".join(rows)
