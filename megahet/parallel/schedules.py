"""Pipeline schedules as data: per-rank lists of actions that can be printed, checked and drawn.

A schedule is ``list[list[Action]]`` indexed by pipeline rank. Model chunk ``c`` of rank ``r`` is virtual
stage ``c * pp + r`` (see ``pipeline_layout``): its forward output goes to rank ``r + 1`` chunk ``c``,
except that rank ``pp - 1`` sends to rank 0 chunk ``c + 1``; gradients flow back the same way.
Receives are placed right before the compute that needs them and sends right after the compute that
produced them. Consecutive send/receive actions form one batch (``comm_batches``) that the executor
posts together (batched isend/irecv, as Megatron's p2p_communication). The checks model NCCL/HCCL
(rendezvous) semantics: nothing is buffered, so a batch completes only when every peer has posted the
matching operations, and messages between a rank pair match in posting order, not by tag.
``validate_schedule`` checks a schedule under exactly those rules, so custom schedules can be tested
without processes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

from megahet.errors import MegahetError
from megahet.parallel.pipeline_layout import check_positive

__all__ = ["Action", "OPS", "comm_batches", "message_key", "align_batches", "all_forward_all_backward", "one_f_one_b", "interleaved_one_f_one_b",
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
    ``new_batch`` (send/recv only; not part of equality) starts a new communication batch instead of
    joining the send/recv actions right before it (set by ``align_batches``, see ``comm_batches``).
    """

    op: str
    chunk: int
    microbatch: int
    peer: int | None = None
    peer_chunk: int | None = None
    new_batch: bool = field(default=False, compare=False)

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


def _with_comm(rank: int, compute: list[tuple[str, int, int]], pp: int, chunks: int,
               units: list[int] | None = None) -> list[Action]:
    """Wrap compute steps in the receives they need and the sends they feed.

    ``units`` (lengths, summing to ``len(compute)``; default one step each) groups consecutive steps:
    a unit's receives all come before its first step and its sends after its last, so the sends of one
    unit and the receives of the next form one batch (Megatron's interleaved steady state posts the
    sends of a forward/backward pair together with the receives of the next pair).
    """
    actions: list[Action] = []
    start = 0
    for size in units or [1] * len(compute):
        recvs, steps, sends = [], [], []
        for op, chunk, mb in compute[start:start + size]:
            prev, nxt = _prev_stage(rank, chunk, pp, chunks), _next_stage(rank, chunk, pp, chunks)
            src, dst = (prev, nxt) if op == "fwd" else (nxt, prev)
            if src:
                recvs.append(Action(f"recv_{op}", chunk, mb, *src))
            steps.append(Action(op, chunk, mb))
            if dst:
                sends.append(Action(f"send_{op}", chunk, mb, *dst))
        actions += recvs + steps + sends
        start += size
    return actions


def _check_sizes(pp_size: int, num_microbatches: int, num_chunks: int) -> None:
    check_positive(pp_size, "--pipeline-model-parallel-size")
    check_positive(num_chunks, "model chunks per rank")
    check_positive(num_microbatches, "micro-batches (--global-batch-size / --micro-batch-size)")


def _warmup_steady_drain(warmup: int, total: int, step: Callable[[int, str], tuple[str, int, int]]):
    """1F1B order of `total` virtual steps: `warmup` forwards, then one forward + one backward, then drain.

    Returns (compute steps, unit lengths): warm-up and drain steps are units of one, each steady
    forward/backward pair one unit of two (see ``_with_comm``).
    """
    steady = total - warmup
    compute = [step(k, "fwd") for k in range(warmup)]
    for i in range(steady):
        compute += [step(warmup + i, "fwd"), step(i, "bwd")]
    compute += [step(k, "bwd") for k in range(steady, total)]
    return compute, [1] * warmup + [2] * steady + [1] * (total - steady)


def all_forward_all_backward(pp_size: int, num_microbatches: int, num_chunks: int = 1) -> list[list[Action]]:
    """GPipe order: every forward, then every backward (chunks in reverse order).

    Simplest to reason about; keeps all micro-batches' activations alive at once.
    """
    _check_sizes(pp_size, num_microbatches, num_chunks)
    # With several chunks, micro-batches pass through the chunks in groups of pp (as in the interleaved
    # schedule): chunk by chunk over all micro-batches would deadlock under rendezvous sends, since the
    # last rank's first chunk-0 output waits for rank 0 to finish every chunk-0 forward.
    groups = [range(g, min(g + pp_size, num_microbatches)) for g in range(0, num_microbatches, pp_size)]
    fwd = [("fwd", c, mb) for group in groups for c in range(num_chunks) for mb in group]
    bwd = [("bwd", c, mb) for group in groups for c in reversed(range(num_chunks)) for mb in group]
    return align_batches([_with_comm(r, fwd + bwd, pp_size, num_chunks) for r in range(pp_size)])


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
    # Each step is its own unit: a forward's send and the next backward's receive form one batch.
    return align_batches([_with_comm(rank, _warmup_steady_drain(pp_size - rank - 1, num_microbatches, step)[0],
                                     pp_size, 1) for rank in range(pp_size)])


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
    # Steady forward/backward pairs are units: with one step per unit, rank r's forward send would wait
    # for a peer that is itself waiting to send (a deadlock under rendezvous sends).
    plans = [_warmup_steady_drain(warmup(rank), total, step) for rank in range(pp_size)]
    return align_batches([_with_comm(rank, compute, pp_size, num_chunks, units)
                          for rank, (compute, units) in enumerate(plans)])


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


def message_key(action: Action) -> tuple[str, int, int]:
    """(direction, receiver chunk, micro-batch) of a send/recv: the same on both ends of one message."""
    if action.op in _SENDS:
        return _SENDS[action.op], action.peer_chunk, action.microbatch
    return _RECVS[action.op], action.chunk, action.microbatch


def _batch_order(action: Action) -> tuple:
    direction, chunk, mb = message_key(action)
    return action.peer, action.op in _RECVS, mb, chunk, direction == "bwd"


def comm_batches(actions: list[Action]) -> list[Action | tuple[Action, ...]]:
    """Compute actions as they are, and each run of consecutive send/recv actions as one tuple.

    An action with ``new_batch`` set starts a new tuple.
    Inside a batch, operations are sorted by (peer, send before recv, micro-batch, receiver chunk,
    direction). Both ends sort the same way, so several messages between one rank pair in one batch are
    posted in the same order on both sides, which libraries that match by order (NCCL, HCCL) need.
    """
    out: list[Action | tuple[Action, ...]] = []
    run: list[Action] = []
    for a in actions:
        if (a.is_compute or a.new_batch) and run:
            out.append(tuple(sorted(run, key=_batch_order)))
            run = []
        if a.is_compute:
            out.append(a)
        else:
            run.append(a)
    if run:
        out.append(tuple(sorted(run, key=_batch_order)))
    return out


def align_batches(actions_per_rank: list[list[Action]]) -> list[list[Action]]:
    """Split communication batches so that each batch meets exactly one batch of each peer.

    ``p2p`` needs a message's shape header before it posts the batch's data, so a batch that receives
    from a peer's later batch would hold back data the peer's earlier batch waits for (a deadlock on
    NCCL/HCCL). Each batch is cut into its intersections with the peers' batches, in the peers' order;
    the k-th pieces for different peers go together. Megatron's schedules come out unchanged; at a
    warm-up/backward turn (all-forward-all-backward, or an interleaved warm-up that covers every
    forward) the last forward's send and the first backward's receive separate, as in Megatron.
    ``validate_schedule`` then checks the result under the exact semantics.
    """
    items = [comm_batches(actions) for actions in actions_per_rank]
    where: dict[tuple, int] = {}   # (rank, message id) -> index of the rank's batch holding it
    ids: dict[int, tuple] = {}     # id(action) -> message id (link, position on the link)
    for rank, rank_items in enumerate(items):
        seen: Counter = Counter()
        for b, item in enumerate(rank_items):
            for a in () if isinstance(item, Action) else item:
                link = (rank, a.peer, "s") if a.op in _SENDS else (a.peer, rank, "s")
                mid = (link, seen[link])
                seen[link] += 1
                ids[id(a)], where[(rank, mid)] = mid, b
    out = []
    for rank, rank_items in enumerate(items):
        actions: list[Action] = []
        for item in rank_items:
            if isinstance(item, Action):
                actions.append(item)
                continue
            pieces: dict[int, list[int]] = {}  # peer -> that peer's batch indices this batch meets
            for a in item:
                pieces.setdefault(a.peer, []).append(where[(a.peer, ids[id(a)])])
            order = {peer: sorted(set(bs)) for peer, bs in pieces.items()}
            parts: dict[int, list[Action]] = {}
            for a in item:
                parts.setdefault(order[a.peer].index(where[(a.peer, ids[id(a)])]), []).append(a)
            for k in sorted(parts):
                group = sorted(parts[k], key=_batch_order)
                actions += [replace(a, new_batch=(i == 0 and k > 0)) for i, a in enumerate(group)]
        out.append(actions)
    return _split_stuck_batches(out)


def _split_stuck_batches(actions_per_rank: list[list[Action]]) -> list[list[Action]]:
    """Where ranks stall on a batch that talks to several peers, post it one peer at a time.

    A batch that sends to one peer and needs a header from another holds its data back until that
    header comes (all-forward-all-backward over several chunks with fewer micro-batches than stages:
    rank 0's chunk-0 send waits for the last rank's chunk-1 header). Posting the send-only pieces first
    releases the data; each split is checked again by the simulation, until none stalls.
    """
    out = [list(actions) for actions in actions_per_rank]
    for _ in range(sum(len(actions) for actions in out) + 1):
        try:
            simulate_schedule(out)
            return out
        except _Deadlock as stall:
            for rank, batch in stall.stuck:
                if len({a.peer for a in batch}) > 1:
                    break
            else:
                return out  # validate_schedule reports the deadlock
        pieces: dict[int, list[Action]] = {}
        for a in batch:
            pieces.setdefault(a.peer, []).append(a)
        ordered = sorted(pieces.values(), key=lambda p: (any(a.op in _RECVS for a in p), p[0].peer))
        first = min(out[rank].index(a) for a in batch)
        starts = out[rank][first].new_batch  # whether the batch itself follows another in the same run
        region = [replace(a, new_batch=i == 0 and (k > 0 or starts))
                  for k, piece in enumerate(ordered) for i, a in enumerate(sorted(piece, key=_batch_order))]
        out[rank][first:first + len(batch)] = region
    return out


class _Deadlock(MegahetError):
    """A stall in ``simulate_schedule``; ``stuck`` lists (rank, batch) for every rank waiting on a batch."""

    def __init__(self, message: str, stuck: list):
        super().__init__(message)
        self.stuck = stuck


def simulate_schedule(actions_per_rank: list[list[Action]], *, fwd_time: float = 1.0,
                      bwd_time: float = 1.0, buffered: bool = False) -> list[list[tuple[Action, float, float]]]:
    """Run all ranks' lists under rendezvous semantics; communication takes no time.

    Each rank posts a batch (``comm_batches``) and waits until every operation in it has its
    counterpart posted: a send is not buffered, it completes only against the peer's matching receive.
    Messages between two ranks match in posting order (as on NCCL/HCCL). As in ``p2p``, a batch first
    posts its shape headers (never blocking) and posts its data sends and receives together only once
    every incoming header is in. Errors (MegahetError): a pair whose n-th send and n-th receive are
    different messages; a stall (a deadlock).
    ``buffered=True`` models gloo instead (sends complete at once, batches need not align): a schedule
    that passes only that way hangs on NCCL/HCCL.

    Returns, per rank, ``(action, start, end)`` of each fwd/bwd.
    """
    n = len(actions_per_rank)
    items = [comm_batches(actions) for actions in actions_per_rank]
    pos, clock = [0] * n, [0.0] * n
    posted: list[list | None] = [None] * n  # per rank: the slots of the batch it has posted
    # (src, dst) -> [[message key, post time, data posted?]] of sends / receives, in posting order.
    sends: dict[tuple[int, int], list] = {}
    recvs: dict[tuple[int, int], list] = {}
    timeline: list[list[tuple[Action, float, float]]] = [[] for _ in range(n)]
    while True:
        progress = False
        for rank in range(n):
            while pos[rank] < len(items[rank]):
                item = items[rank][pos[rank]]
                if isinstance(item, Action):
                    end = clock[rank] + (fwd_time if item.op == "fwd" else bwd_time)
                    timeline[rank].append((item, clock[rank], end))
                    clock[rank] = end
                else:
                    state = _advance_batch(rank, item, posted, sends, recvs, clock, buffered)
                    progress = progress or state != "waiting"
                    if state != "done":
                        break
                pos[rank] += 1
                progress = True
        if all(pos[r] == len(items[r]) for r in range(n)):
            return timeline
        if not progress:
            waiting = [(r, items[r][pos[r]]) for r in range(n) if pos[r] < len(items[r])]
            stuck = "; ".join(f"rank {r} at {' '.join(map(str, batch))}" for r, batch in waiting)
            raise _Deadlock(f"pipeline schedule deadlocks under rendezvous sends: {stuck}; fix the "
                            f"schedule's action order", [(r, b) for r, b in waiting if not isinstance(b, Action)])


def _advance_batch(rank, batch, posted, sends, recvs, clock, buffered) -> str:
    """One step of ``rank``'s current batch, as ``p2p`` runs it: post the shape headers ("posted");
    once every incoming header is in, post the data sends and receives together; "done" when every
    operation has met its counterpart, "waiting" before."""
    if posted[rank] is None:
        slots = []
        for a in batch:
            is_send = a.op in _SENDS
            link = (rank, a.peer) if is_send else (a.peer, rank)
            queue = (sends if is_send else recvs).setdefault(link, [])
            entry = [message_key(a), clock[rank], buffered and is_send]  # [key, post time, data posted?]
            slots.append((is_send, link, len(queue), entry, a.peer))
            queue.append(entry)
        posted[rank] = slots
        return "posted"
    slots = posted[rank]
    if not all(slot[3][2] for slot in slots):  # data not posted yet: waiting for incoming headers
        if not all(len(sends.get(link, ())) > i for is_send, link, i, _, _ in slots if not is_send):
            return "waiting"
        for slot in slots:
            slot[3][2], slot[3][1] = True, clock[rank]
        return "posted"
    others = [((recvs if is_send else sends).get(link, ()), i) for is_send, link, i, _, _ in slots]
    if not all((buffered and slot[0]) or (len(q) > i and q[i][2]) for slot, (q, i) in zip(slots, others)):
        return "waiting"
    for (is_send, link, i, entry, _), (queue, _) in zip(slots, others):
        if buffered and is_send:
            continue
        their_key, at, _ = queue[i]
        if their_key != entry[0]:
            sent, expected = (entry[0], their_key) if is_send else (their_key, entry[0])
            raise MegahetError(f"pipeline messages from rank {link[0]} to rank {link[1]} match out of order: "
                               f"send number {i + 1} is {sent} but receive number {i + 1} expects {expected}; "
                               f"order sends and receives alike on both ranks")
        clock[rank] = max(clock[rank], at)
    posted[rank] = None
    return "done"


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
