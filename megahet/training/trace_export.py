"""Export the measured pipeline schedule of a step (every rank's actions) as Chrome trace and PNG."""
from __future__ import annotations

import logging
import os
from typing import List

import torch.distributed as dist

from megahet.parallel.context import ParallelContext
from megahet.parallel.schedule_trace import (TraceEvent, bubble_fraction, write_chrome_trace,
                                             write_timeline_png)

log = logging.getLogger("megahet")


def gather_events(events: List[TraceEvent], ctx: ParallelContext) -> List[List[TraceEvent]]:
    """Every rank's events on every rank (ordered by global rank), on one shared time origin."""
    if ctx.world_size > 1:
        everyone: list = [None] * ctx.world_size
        dist.all_gather_object(everyone, [(e.name, e.category, e.start, e.end) for e in events],
                               group=ctx.world_group.pg)
        per_rank = [[TraceEvent(*e) for e in rank_events] for rank_events in everyone]
    else:
        per_rank = [list(events)]
    return align_to_start(per_rank)


def align_to_start(per_rank: List[List[TraceEvent]]) -> List[List[TraceEvent]]:
    """Shift every rank's events so the earliest one starts at 0 (perf_counter is one clock per host)."""
    t0 = min((e.start for r in per_rank for e in r), default=0.0)
    return [[TraceEvent(e.name, e.category, e.start - t0, e.end - t0) for e in r] for r in per_rank]


def export_step_trace(path: str, events: List[TraceEvent], ctx: ParallelContext) -> None:
    """Write `path` (Chrome trace JSON) and `path`.png from rank 0; every rank must call this."""
    per_rank = gather_events(events, ctx)
    if ctx.rank != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    # One row per rank, labelled and colored by the device group that serves it.
    labels, groups = rank_labels(ctx)
    write_chrome_trace(path, per_rank, labels)
    try:
        write_timeline_png(os.path.splitext(path)[0] + ".png", per_rank, labels, groups)
    except Exception as exc:  # noqa: BLE001 - the PNG is a convenience; the JSON is the record
        log.warning("could not draw the timeline PNG: %s", exc)
    log.info("schedule trace written to %s (bubble %.1f%%)", path, 100 * bubble_fraction(per_rank))


def rank_labels(ctx: ParallelContext):
    """('rank r: pipeline d stage k tp t, group/backend' per rank, the group name per rank)."""
    groups = [""] * ctx.world_size
    labels = [f"rank {r}" for r in range(ctx.world_size)]
    backends = {}
    if ctx.cluster is not None:
        names = [g.name for g in ctx.cluster.groups for _ in range(g.devices)]
        backends = {g.name: g.backend for g in ctx.cluster.groups}
        groups = names[:ctx.world_size]
    for d, row in enumerate(ctx.assignment):
        for k, ranks in enumerate(row):
            for t, r in enumerate(ranks):
                where = f"{groups[r]}/{backends.get(groups[r], '')}" if groups[r] else ctx.rank_domains[r]
                labels[r] = f"rank {r}: p{d} s{k} tp{t} {where}"
    return labels, [g or ctx.rank_domains[r] for r, g in enumerate(groups)]
