"""Gradient reductions that are not data parallelism: sequence-parallel norms and tied embeddings.

They run once per step after the last backward, on whatever holds the accumulated gradient (the
data-parallel buffer's `main_grad` when present, else `.grad`).

The tied embedding lives on the first and the last stage. With the same TP degree there, TP rank t
of both stages holds the same vocabulary rows and one all-reduce over the pair sums them. With
different TP degrees (a plan may give stages their own) the rows differ: each rank exchanges, with
every rank of the other stage whose rows overlap its own, exactly the overlapping rows (per link:
native in one domain, bridged across), before the data-parallel reduction.
"""
from __future__ import annotations

from typing import Iterable

from fractions import Fraction

import torch

from megahet.parallel.comm import CommGroup
from megahet.parallel.links import Recv, Send


def grad_of(p: torch.Tensor):
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def _reduce_flat(grads, group: CommGroup):
    """Sum a list of tensors over `group` with one collective (flatten, reduce, copy back)."""
    grads = [g for g in grads if g is not None]
    if not grads or group.size == 1:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    group.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def allreduce_sequence_parallel_grads(params: Iterable[torch.Tensor], tp_group: CommGroup) -> None:
    """Norm weights (and other replicated params) saw only this rank's sequence shard: sum over TP."""
    _reduce_flat([grad_of(p) for p in params if getattr(p, "sequence_parallel", False)], tp_group)


def allreduce_embedding_grads(params: Iterable[torch.Tensor], embedding_group: CommGroup) -> None:
    """The tied word embedding lives on the first and the last stage: sum both copies' grads."""
    _reduce_flat([grad_of(p) for p in params if getattr(p, "shared_embedding", False)], embedding_group)


def embedding_resliced(ctx) -> bool:
    """True when the tied embedding's first- and last-stage copies are split over different TP degrees."""
    tps = ctx.stage_tp if ctx.assignment else [ctx.tp]
    return ctx.pp > 1 and tps[0] != tps[-1]


def embedding_shards_misaligned(ctx) -> bool:
    """True when some pipeline's first- and last-stage ranks sit at different places in their
    (sorted) data-parallel groups, so the distributed optimizer's shards of the tied embedding differ."""
    if ctx.pp == 1 or not ctx.assignment:
        return False
    a = ctx.assignment
    for t in range(min(len(a[0][0]), len(a[0][-1]))):
        first = sorted(p[0][t] for p in a)
        last = sorted(p[-1][t] for p in a)
        if any(first.index(p[0][t]) != last.index(p[-1][t]) for p in a):
            return True
    return False


def exchange_resliced_embedding_grads(params: Iterable[torch.Tensor], ctx) -> None:
    """Add to this rank's tied-embedding rows the other stage's gradient of the same rows.

    First stage rank t holds rows [t/tp0, (t+1)/tp0) of the padded vocabulary, last stage rank u rows
    [u/tpL, (u+1)/tpL); each overlapping pair swaps its overlap. Both sides add the same two numbers,
    so the copies stay bit-identical.
    """
    grads = [grad_of(p) for p in params if getattr(p, "shared_embedding", False)]
    if not grads:
        return
    grad = grads[0]  # [V/tp, h] this rank's rows
    other = ctx.pp - 1 if ctx.pp_rank == 0 else 0
    mine_tp, other_ranks = ctx.tp, ctx.stage_ranks[other]
    vocab = grad.shape[0] * mine_tp
    lo, hi = Fraction(ctx.tp_rank, mine_tp), Fraction(ctx.tp_rank + 1, mine_tp)
    sends, recvs, where = [], [], []
    for u, rank in enumerate(other_ranks):
        a = max(lo, Fraction(u, len(other_ranks)))
        b = min(hi, Fraction(u + 1, len(other_ranks)))
        if a >= b:
            continue
        r0, r1 = int((a - lo) * vocab), int((b - lo) * vocab)
        sends.append(Send(grad[r0:r1], rank))
        recvs.append(Recv((r1 - r0,) + tuple(grad.shape[1:]), grad.dtype, rank))
        where.append((r0, r1))
    received = ctx.links.exchange(sends, recvs)
    for (r0, r1), piece in zip(where, received):
        grad[r0:r1] += piece
