"""Straggler detection and online rebalancing of micro-batches between data-parallel replicas.

Every step each rank's forward/backward time goes into one all-reduce over the world group (a vector
with one slot per rank), so every rank sees every rank's time and takes the same decisions. A rank
slower than `threshold` x the median is reported (log, metrics, wandb).

With --rebalance, replica (plan pipeline) r's cost per sample is estimated as (its slowest rank's compute time) /
(its samples), smoothed over steps. When a split of the global batch in whole micro-batches
proportional to the measured speeds would make the step at least `min_gain` faster, the running plan's
per-pipeline micro-batch counts change at the step boundary (micro-batch sizes stay). Uneven replica batches are exact in megahet (losses and gradients are weighted
by the global batch's tokens, see train_step.py), so only the floating-point reduction order changes,
never the math or the data order. Checkpoints record the running plan, so a restart with --rebalance
continues from the split reached (`saved_split`), not the plan file's.
"""
from __future__ import annotations

import logging
import math
import statistics
from typing import Dict, List, Optional, Sequence

import torch

from megahet.errors import MegahetError
from megahet.hetero.batch_split import min_max_split
from megahet.hetero.plan import Plan
from megahet.parallel.context import ParallelContext

log = logging.getLogger("megahet")


def gather_compute_times(ctx: ParallelContext, compute_s: float) -> List[float]:
    """Every rank's compute time of this step (a collective: one all-reduce of a [world] vector)."""
    times = torch.zeros(ctx.world_size, dtype=torch.float64, device=ctx.world_group.device)  # [world]
    times[ctx.rank] = compute_s
    ctx.world_group.all_reduce(times)
    return times.tolist()


def replica_of_rank(ctx: ParallelContext) -> List[int]:
    """Data-parallel replica (pipeline of the plan) of every global rank."""
    out = [0] * ctx.world_size
    for d, stages in enumerate(ctx.assignment):  # [pipeline][stage] -> global ranks
        for ranks in stages:
            for r in ranks:
                out[r] = d
    return out


def straggler_report(times: Sequence[float], threshold: float) -> Dict[str, float]:
    """Metrics for this step; `straggler_rank` is -1 when no rank is beyond `threshold` x the median."""
    median = statistics.median(times)
    slowest = max(range(len(times)), key=lambda r: times[r])
    ratio = times[slowest] / median if median > 0 else 1.0
    return {"compute_time_max_s": times[slowest], "compute_time_median_s": median, "slowest_rank": slowest,
            "slowest_ratio": ratio, "straggler_rank": slowest if ratio > threshold else -1,
            "rank_compute_time_s": list(times)}


def best_split(cost_per_sample: Sequence[float], global_batch_size: int,
               micro_batch_sizes: Sequence[int]) -> Optional[List[int]]:
    """Samples per replica (whole micro-batches of each replica's own size, at least one each) summing to
    the global batch and minimising the slowest replica's time; None when no such split exists.

    Equal micro-batch sizes: greedy (each next micro-batch to the replica that would finish it earliest),
    optimal for identical jobs on machines of different speeds. Mixed sizes: the exact min-max split
    (batch_split.min_max_split, shared with the planner).
    """
    sizes = list(micro_batch_sizes)
    if len(set(sizes)) == 1:
        m = sizes[0]
        if global_batch_size % m or global_batch_size < m * len(sizes):
            return None
        counts = [1] * len(sizes)
        for _ in range(global_batch_size // m - len(sizes)):
            r = min(range(len(sizes)), key=lambda i: ((counts[i] + 1) * cost_per_sample[i], i))
            counts[r] += 1
        return [c * m for c in counts]
    times = [[s * c if s % m == 0 else math.inf for s in range(global_batch_size + 1)]
             for m, c in zip(sizes, cost_per_sample)]
    return min_max_split(times, global_batch_size)


def predicted_step(sizes: Sequence[int], cost_per_sample: Sequence[float]) -> float:
    return max(s * c for s, c in zip(sizes, cost_per_sample))


class Rebalancer:
    """Chooses the per-replica sample counts for the next step from measured compute times.

    Args:
        global_batch_size, micro_batch_sizes: the split is in whole micro-batches (each replica keeps
            its own micro-batch size) summing to the batch.
        min_gain: change the split only when the predicted step time drops by at least this fraction.
        smoothing: weight of the newest measurement in the per-sample cost estimate (1 = no memory).
    """

    def __init__(self, global_batch_size: int, micro_batch_sizes: Sequence[int], *, min_gain: float = 0.05,
                 smoothing: float = 0.5, warmup_steps: int = 1):
        self.global_batch_size, self.micro_batch_sizes = global_batch_size, list(micro_batch_sizes)
        self.min_gain, self.smoothing = min_gain, smoothing
        self.warmup_steps = warmup_steps  # first steps (allocation, caches) do not tell a device's speed
        self.cost: Optional[List[float]] = None

    def update(self, sizes: List[int], replica_times: Sequence[float]) -> List[int]:
        """Sizes for the next step given this step's `sizes` and each replica's compute time."""
        if self.warmup_steps > 0:
            self.warmup_steps -= 1
            return list(sizes)
        measured = [t / max(s, 1) for t, s in zip(replica_times, sizes)]
        if self.cost is None:
            self.cost = measured
        else:
            a = self.smoothing
            self.cost = [a * m + (1 - a) * c for m, c in zip(measured, self.cost)]
        best = best_split(self.cost, self.global_batch_size, self.micro_batch_sizes)
        if best is not None and predicted_step(best, self.cost) < (1 - self.min_gain) * predicted_step(sizes, self.cost):
            return best
        return list(sizes)


def saved_split(meta: Optional[dict], plan, global_batch_size: int) -> Optional[List[int]]:
    """Per-pipeline micro-batch counts a checkpoint was running with, when its plan is this `plan`
    re-split by --rebalance (same layers, pipelines, stage groups and micro-batch sizes, same global
    batch) and differs from it; None otherwise (no plan saved, another plan, an elastic re-plan).

    --rebalance edits the running plan's counts and checkpoints record the running plan, so a restart
    continues with the measured balance instead of going back to the plan file's split.
    """
    raw = (meta or {}).get("plan")
    if not raw or plan is None:
        return None
    try:
        saved = Plan.from_dict(raw, source="checkpoint plan")
    except MegahetError:
        return None
    shape = lambda p: (list(p.layers), [(q.micro_batch_size, [(s.group, s.tensor_parallel) for s in q.stages])  # noqa: E731
                                        for q in p.pipelines])
    if shape(saved) != shape(plan) or sum(q.samples for q in saved.pipelines) != global_batch_size:
        return None
    counts = [q.micro_batches for q in saved.pipelines]
    return None if counts == [q.micro_batches for q in plan.pipelines] else counts


class StragglerMonitor:
    """Per-step straggler metrics and, with `rebalance`, the replica split for the next step."""

    def __init__(self, ctx: ParallelContext, global_batch_size: int, micro_batch_sizes: Sequence[int], *,
                 threshold: float = 1.5, rebalance: bool = False):
        if rebalance and ctx.ep > 1:
            raise MegahetError("--rebalance cannot change micro-batch counts under expert parallelism (the "
                               "pipelines of an expert-parallel group must keep equal counts); drop --rebalance")
        self.ctx, self.threshold = ctx, threshold
        self.replica = replica_of_rank(ctx)
        self.rebalancer = Rebalancer(global_batch_size, micro_batch_sizes) if rebalance else None
        self._warned = -1

    def step(self, compute_s: float, sizes: List[int], iteration: int, warn: bool) -> tuple:
        """Collective. Returns (metrics for this step, replica sizes for the next step)."""
        times = gather_compute_times(self.ctx, compute_s)
        report = straggler_report(times, self.threshold)
        if report["straggler_rank"] >= 0 and warn and self._warned != report["straggler_rank"]:
            log.warning("iteration %d: rank %d is a straggler: compute %.3fs, %.2fx the median %.3fs%s",
                        iteration, report["straggler_rank"], report["compute_time_max_s"], report["slowest_ratio"],
                        report["compute_time_median_s"], "" if self.rebalancer else " (--rebalance would move work)")
        self._warned = report["straggler_rank"]
        if self.rebalancer is None or self.ctx.dp == 1:
            return report, sizes
        per_replica = [0.0] * self.ctx.dp
        for r, t in enumerate(times):  # a replica is as slow as its slowest rank
            per_replica[self.replica[r]] = max(per_replica[self.replica[r]], t)
        new = self.rebalancer.update(sizes, per_replica)
        if self.rebalancer.cost is not None:
            report["replica_s_per_sample"] = list(self.rebalancer.cost)
        if new != sizes and warn:
            log.info("iteration %d: rebalancing replica batches %s -> %s (measured s/sample %s)", iteration, sizes,
                     new, [round(c, 4) for c in self.rebalancer.cost])
        return report, new
