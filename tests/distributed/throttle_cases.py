"""Rank functions for simulated sites: a cpu rank and a sim rank on two sites joined by a slow link."""
import time

import torch

from megahet.parallel.context import RankSpec, build_parallel_context
from megahet.parallel.link_throttle import site_throttles
from megahet.parallel.links import Recv, Send


def timed_cross_site_messages(latency_ms, gbps, numel):
    """A pipeline-style message rank 0 -> rank 1, a hierarchical all-reduce, then a world all-reduce of a
    scalar; seconds each took."""
    table = site_throttles(["dc1", "dc2"], {"cross_site": gbps, "cross_site_latency_ms": latency_ms}) \
        if latency_ms else None
    ctx = build_parallel_context(rank_specs=[RankSpec("cpu"), RankSpec("sim", {"speed": 1.0})], timeout_s=60,
                                 link_throttle=table)
    x = torch.arange(numel, dtype=torch.float32) + ctx.rank  # [numel]
    ctx.world_group.barrier()
    start = time.perf_counter()
    if ctx.rank == 0:
        ctx.links.exchange([Send(x, 1)], [])
        got = None
    else:
        (got,) = ctx.links.exchange([], [Recv((numel,), torch.float32, 0)])
    p2p_s = time.perf_counter() - start
    throttle = ctx.links.throttle
    p2p_waited = throttle.waited_s if throttle is not None else 0.0  # slept for link time, not load
    ctx.world_group.barrier()
    start = time.perf_counter()
    ctx.dp_group.all_reduce(x)
    reduce_s = time.perf_counter() - start
    scalar = torch.ones(1, dtype=torch.float64)  # [1] as the job-wide loss / gradient norm
    start = time.perf_counter()
    ctx.world_group.all_reduce(scalar)
    world_s = time.perf_counter() - start
    return {"p2p_s": p2p_s, "reduce_s": reduce_s, "got": got, "sum": x, "p2p_waited_s": p2p_waited,
            "throttled": throttle is not None, "world_s": world_s, "scalar": float(scalar[0]),
            "world_delayed": ctx.world_group.link_delay is not None,
            "hierarchical": type(ctx.dp_group).__name__}
