"""Whole-job gradient norm, found-inf flag and clipping.

Every logical gradient element is counted exactly once over the whole job, then ONE all-reduce over
the world group combines the ranks (one deterministic group, not a loop over overlapping groups, so
every rank gets the same bits). Which copy counts:
    replicated over TP (tp_dim None)   tp_rank 0 (sequence-parallel grads were summed over TP before)
    dense params                       dp_rank 0, or every rank's own shard when sharded_over_dp
    expert params (is_expert)          expert_dp_rank 0, or every rank's own shard when sharded_over_dp
    tied embedding on the last stage   skipped: the first stage's copy counts
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from megahet.parallel.grad_sync import grad_of


def counted_here(param: torch.Tensor, ctx, sharded_over_dp: bool = False) -> bool:
    """Whether this rank's copy of `param`'s gradient is the one that counts in job-wide sums."""
    if getattr(param, "shared_embedding", False) and ctx.pp_rank != 0:
        return False  # the last stage's copy of the tied embedding duplicates the first stage's
    if getattr(param, "tp_dim", None) is None and ctx.tp_rank != 0:
        return False
    if sharded_over_dp:
        return True  # each data-parallel rank holds a distinct shard
    if getattr(param, "is_expert", False):
        return ctx.expert_dp_rank == 0
    return ctx.dp_rank == 0


def _pairs(params, grads):
    if grads is None:
        grads = [grad_of(p) for p in params]
    if len(grads) != len(params):
        raise ValueError(f"{len(params)} params but {len(grads)} grads")
    return zip(params, grads)


def global_grad_norm(params: Sequence[torch.Tensor], ctx, grads: Optional[Sequence[torch.Tensor]] = None,
                     sharded_over_dp: bool = False) -> float:
    """L2 norm of the gradient of the whole model across all ranks.

    Args:
        params: this rank's params (their flags decide which copy counts).
        grads: the gradient (or, for the distributed optimizer, this rank's owned piece of it) of
            each param; default: each param's main_grad (else .grad).
        sharded_over_dp: grads are data-parallel shards (distributed optimizer): count every rank's.
    """
    group = ctx.world_group
    counted = [g for p, g in _pairs(params, grads)
               if g is not None and g.numel() and counted_here(p, ctx, sharded_over_dp)]
    # One multi-tensor call (per-tensor norms, the same bits as a loop of vector_norm, without a
    # Python round per tensor), one device-to-host trip, then the one job-wide reduction.
    total = (torch.stack(torch._foreach_norm(counted, 2, dtype=torch.float32)).square().sum().reshape(1)
             .to(group.device) if counted
             else torch.zeros(1, dtype=torch.float32, device=group.device))  # [1] sum of squares
    group.all_reduce(total)
    return math.sqrt(float(total.item()))


def found_inf(grads: Sequence[Optional[torch.Tensor]], ctx) -> bool:
    """True when any gradient element on any rank is NaN or Inf (MAX over the world group)."""
    group = ctx.world_group
    bad = [torch.logical_not(torch.isfinite(g).all()).reshape(1) for g in grads if g is not None and g.numel()]
    flag = (torch.cat(bad).any().float().reshape(1).to(group.device) if bad
            else torch.zeros(1, dtype=torch.float32, device=group.device))
    group.all_reduce(flag, op="max")  # every rank must take the same skip decision
    return bool(flag.item() > 0)


def clip_grads(grads: Sequence[Optional[torch.Tensor]], max_norm: float, total_norm: float) -> float:
    """Scale `grads` in place so their norm is at most `max_norm` (Megatron's coefficient).

    Returns the coefficient applied (1.0 when no clipping was needed or max_norm <= 0).
    """
    if max_norm <= 0 or not math.isfinite(total_norm):
        return 1.0
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff >= 1.0:
        return 1.0
    present = [g for g in grads if g is not None]
    if present:
        torch._foreach_mul_(present, coeff)  # one multi-tensor kernel where the device has it
    return coeff
