"""Rank functions and plan/cluster texts for heterogeneous plans (cpu + sim domains)."""
import torch

from megahet.parallel.context import RankSpec, build_parallel_context


def cluster_text(*groups) -> str:
    """groups: (name, backend, devices) -> cluster YAML."""
    lines = ["groups:"]
    for name, backend, devices in groups:
        speed = ", speed: 1.0" if backend == "sim" else ""
        lines.append(f"  - {{name: {name}, backend: {backend}, devices: {devices}{speed}}}")
    return "\n".join(lines) + "\n"


def plan_text(layers, pipelines, expert_parallel=1) -> str:
    """pipelines: [(micro_batch_size, micro_batches, [(group, tp), ...]), ...] -> plan YAML."""
    lines = [f"layers: {list(layers)}", f"expert_parallel: {expert_parallel}", "pipelines:"]
    for mbs, count, stages in pipelines:
        lines += [f"  - micro_batch_size: {mbs}", f"    micro_batches: {count}", "    stages:"]
        lines += [f"      - {{group: {g}, tensor_parallel: {tp}}}" for g, tp in stages]
    return "\n".join(lines) + "\n"


def hierarchical_collectives(domains):
    """One dp group over ranks in several domains: all-reduce and reduce-scatter, with bridge counters."""
    specs = [RankSpec("cpu") if d == "cpu" else RankSpec("sim", {"domain": d}) for d in domains]
    ctx = build_parallel_context(tp=1, pp=1, rank_specs=specs, timeout_s=30)
    n = len(domains)
    out = {"kind": type(ctx.dp_group).__name__}
    before = ctx.counters.bridge_bytes
    x = torch.arange(10, dtype=torch.float32) * (ctx.rank + 1) + 0.25  # [10]
    work = ctx.dp_group.all_reduce(x, async_op=True)  # overlapped: runs on the group's worker
    work.wait()
    out["all_reduce"] = x
    out["all_reduce_bridge_bytes"] = ctx.counters.bridge_bytes - before
    y = torch.arange(4 * n, dtype=torch.bfloat16).reshape(n * 2, 2) * (ctx.rank + 1)  # [2n, 2] bf16
    mine = torch.empty(2, 2, dtype=torch.bfloat16)
    ctx.dp_group.reduce_scatter_into(mine, y)
    out["reduce_scatter"] = mine.float()
    m = torch.tensor([float(ctx.rank)])
    ctx.dp_group.all_reduce(m, op="max")
    out["max"] = float(m)
    out["gather"] = ctx.dp_group.all_gather(torch.tensor([ctx.rank]))
    ctx.dp_group.close()
    return out


def train_with_fp32_backend(over: dict):
    """Register `sim_fp32` (a sim device without bf16) in this rank, then train."""
    from megahet.backends.sim import SimBackend
    from megahet.device import register_backend
    from tests.distributed.train_cases import train

    class SimNoBF16(SimBackend):
        supports_bf16 = False

    register_backend("sim_fp32", SimNoBF16)
    return train(over)


def two_site_collectives():
    """Four cpu ranks (one vendor), two per site: the dp group is hierarchical by site and only messages
    between sites take the bridge."""
    from megahet.parallel.links import Recv, Send
    ctx = build_parallel_context(tp=1, pp=1, rank_specs=[RankSpec("cpu")] * 4, timeout_s=30,
                                 rank_sites=["dc1", "dc1", "dc2", "dc2"])
    out = {"kind": type(ctx.dp_group).__name__}
    before = ctx.counters.bridge_bytes
    x = torch.arange(10, dtype=torch.float32) * (ctx.rank + 1) + 0.25  # [10]
    ctx.dp_group.all_reduce(x)
    out["all_reduce"], out["reduce_bridge_bytes"] = x, ctx.counters.bridge_bytes - before
    before, native = ctx.counters.bridge_bytes, ctx.counters.native_bytes
    y = torch.ones(8)  # [8]: rank 0 -> 1 inside dc1, rank 1 -> 2 across
    sends = [Send(y, ctx.rank + 1)] if ctx.rank in (0, 1) else []
    recvs = [Recv((8,), torch.float32, ctx.rank - 1)] if ctx.rank in (1, 2) else []
    ctx.links.exchange(sends, recvs)
    out["p2p_bridge_bytes"] = ctx.counters.bridge_bytes - before
    out["p2p_native_bytes"] = ctx.counters.native_bytes - native
    ctx.dp_group.close()
    return out
