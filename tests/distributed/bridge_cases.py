"""Rank functions for cross-domain (bridged) groups: a cpu rank and a sim rank."""
import torch

from megahet.parallel.context import RankSpec, build_parallel_context


def bridged_collectives():
    ctx = build_parallel_context(tp=1, pp=1, rank_specs=[RankSpec("cpu"), RankSpec("sim", {"speed": 1.0})],
                                 timeout_s=30)
    out = {"bridged": ctx.dp_group.bridged, "world_bridged": ctx.world_group.bridged,
           "backend": ctx.backend.name}
    x = torch.full((4,), 1.0 + ctx.rank / 256, dtype=torch.bfloat16)  # bf16: must be reduced in fp32
    ctx.dp_group.all_reduce(x)
    out["sum_bf16"] = x.clone()
    out["dtype"] = str(x.dtype)
    y = torch.arange(4, dtype=torch.float32) + 10 * ctx.rank
    out["gather"] = ctx.dp_group.all_gather(y)
    out["rs"] = ctx.dp_group.reduce_scatter(torch.arange(4, dtype=torch.float32) * (ctx.rank + 1))
    return out


def tp_across_domains():
    build_parallel_context(tp=2, pp=1, rank_specs=[RankSpec("cpu"), RankSpec("sim")], timeout_s=30)
