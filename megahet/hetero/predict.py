"""Predicted step time, throughput, MFU and memory of one concrete plan.

A plan here is the plan-file dict (layers, virtual_stages, expert_parallel, pipelines with micro-batch
size, count and per-stage group and TP). Each distinct pipeline is simulated once on its real schedule
(simulate.py) with per-rank, per-chunk times from the cost model; step time is the slowest pipeline,
plus the data-parallel reduction not hidden behind backward, plus the optimizer step (gradient norm,
clipping, AdamW), plus the step's scalar all-reduces.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from megahet.errors import MegahetError
from megahet.hetero import cost_model as cm
from megahet.hetero.simulate import PipelineResult, inflight_peak, pipeline_schedule, simulate_pipeline
from megahet.parallel.pipeline_layout import layers_per_stage


@dataclass
class Options:
    """Training settings that change cost but are not part of the plan file."""
    recompute: Optional[str] = None           # None | "selective" | "full"
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False


@dataclass
class StageCost:
    group: str
    tp: int
    layers: int
    fwd_s: float
    bwd_s: float
    memory: cm.Memory
    inflight: int


@dataclass
class Prediction:
    """What tools/plan.py prints and --json emits."""
    step_time_s: float
    tokens_per_s: float
    pipeline_time_s: float
    dp_exposed_s: float
    optimizer_s: float
    bubble: float
    groups: Dict[str, Dict[str, float]]           # name -> memory_gb, tflops, mfu, devices_used
    stages: List[StageCost]                       # of the slowest pipeline
    feasible: bool
    overflow: Dict[str, float] = field(default_factory=dict)  # group -> GB over its memory
    slowest: Optional[PipelineResult] = None
    mfu: float = 0.0
    framework_s: float = 0.0  # the step's scalar all-reduces (token count, gradient norm, loss)

    def summary(self) -> Dict[str, float]:
        return {"step_time_s": self.step_time_s, "pipeline_s": self.pipeline_time_s, "dp_exposed_s": self.dp_exposed_s,
                "optimizer_s": self.optimizer_s, "framework_s": self.framework_s, "bubble": self.bubble}


def _pipeline_key(p: dict) -> tuple:
    return (p["micro_batch_size"], p["micro_batches"], tuple((s["group"], s["tensor_parallel"]) for s in p["stages"]))


def predict(plan: dict, spec: cm.ModelSpec, groups: Dict[str, cm.GroupSpec], links: cm.Links,
            options: Options = Options(), keep_timeline: bool = False) -> Prediction:
    """Predict a plan dict; raises MegahetError for plans that name unknown groups or bad sizes."""
    layers, v = list(plan["layers"]), int(plan.get("virtual_stages", 1) or 1)
    ep = int(plan.get("expert_parallel", 1) or 1)
    pipes = plan["pipelines"]
    p = len(layers)
    for pipe in pipes:
        if len(pipe["stages"]) != p:
            raise MegahetError(f"plan pipeline has {len(pipe['stages'])} stages but 'layers' lists {p}")
        for s in pipe["stages"]:
            if s["group"] not in groups:
                raise MegahetError(f"plan names group '{s['group']}' which the cluster spec does not have")
    ranges = layers_per_stage(spec.num_layers, p, v, layers if sum(layers) == spec.num_layers else None)
    dp = len(pipes)
    expert_dp = max(dp // ep, 1)
    tokens_step = sum(q["micro_batch_size"] * q["micro_batches"] for q in pipes) * spec.seq
    # One simulation per distinct pipeline.
    distinct: Dict[tuple, dict] = {}
    for pipe in pipes:
        distinct.setdefault(_pipeline_key(pipe), pipe)
    results: Dict[tuple, Tuple[PipelineResult, List[StageCost]]] = {}
    blocks = plan.get("recompute_layers")  # per-stage recompute: full-recompute layers per chunk
    if blocks is not None and len(blocks) != p:
        raise MegahetError(f"plan recompute_layers lists {len(blocks)} stages but 'layers' lists {p}")
    for key, pipe in distinct.items():
        results[key] = _simulate(pipe, ranges, spec, groups, links, options, ep, dp, expert_dp, keep_timeline,
                                 blocks)
    slow_key = max(results, key=lambda k: results[k][0].time)
    slow, slow_stages = results[slow_key]
    # Data-parallel reduction per stage, over that stage's ranks in every pipeline.
    dp_exposed, opt_time = 0.0, 0.0
    for k in range(p):
        members: Dict[str, int] = {}
        for pipe in pipes:
            members[pipe["stages"][k]["group"]] = members.get(pipe["stages"][k]["group"], 0) + 1
        stage = slow_stages[k]
        count = cm.stage_params(spec, [i for r in ranges[k] for i in r], stage.tp, ep, k == 0, k == p - 1, p)
        dense_grad = (count.dense + count.fp32) * 4
        gs = [groups[g] for g in members]
        t = cm.dp_reduce_time(dense_grad, gs, list(members.values()), links, stage.tp,
                              options.distributed_optimizer, spec.param_bytes)
        if count.expert and expert_dp > 1:
            t += cm.dp_reduce_time(count.expert * 4, gs, [max(c // ep, 1) for c in members.values()], links,
                                   stage.tp, options.distributed_optimizer, spec.param_bytes)
        window = stage.bwd_s if options.overlap_grad_reduce else 0.0
        dp_exposed = max(dp_exposed, max(0.0, t - window))
        local = count.total
        if options.distributed_optimizer:
            local = (count.dense + count.fp32) / dp + count.expert / expert_dp
        opt_time = max(opt_time, max(cm.optimizer_time(groups[g], local) for g in members))
    used = {s["group"] for pipe in pipes for s in pipe["stages"]}
    world = sum(int(s["tensor_parallel"]) for pipe in pipes for s in pipe["stages"])
    framework = cm.step_collectives_time([groups[g] for g in sorted(used)], world, links, dp)
    step = slow.time + dp_exposed + opt_time + framework
    tokens_per_s = tokens_step / step if step > 0 else 0.0
    # Memory per group (worst rank) and overflow.
    mem_by_group: Dict[str, float] = {}
    overflow: Dict[str, float] = {}
    for key, (_, stages) in results.items():
        for s in stages:
            mem_by_group[s.group] = max(mem_by_group.get(s.group, 0.0), s.memory.total)
    for g, need in mem_by_group.items():
        have = groups[g].memory_bytes
        if need > have:
            overflow[g] = (need - have) / cm.GB
    group_stats = _group_stats(plan, spec, groups, ranges, step, mem_by_group)
    peaks = sum(groups[g].peak_tflops * groups[g].devices for g in groups) * 1e12
    model_flops = tokens_step * _model_flops_per_token(spec)
    return Prediction(step_time_s=step, tokens_per_s=tokens_per_s, pipeline_time_s=slow.time, dp_exposed_s=dp_exposed,
                      optimizer_s=opt_time, framework_s=framework, bubble=slow.bubble, groups=group_stats, stages=slow_stages,
                      feasible=not overflow, overflow=overflow, slowest=slow if keep_timeline else None,
                      mfu=model_flops / step / peaks if peaks and step else 0.0)


def _model_flops_per_token(spec: cm.ModelSpec) -> float:
    layers = sum(cm.layer_flops(spec, spec.is_moe(i)) for i in range(spec.num_layers))
    return 3.0 * (layers + cm.head_flops(spec))


def _chunk_cost(spec, group, links, layer_ids, first, last, mbs, tp, ep, recompute,
                block: Optional[int] = None) -> Tuple[float, float, float]:
    """(fwd s, bwd s, activation bytes held per micro-batch) of one model chunk on one rank.

    block: with per-stage recompute, the number of this chunk's first layers recomputed in full.
    """
    fwd = bwd = 0.0
    act = 0.0
    tokens = mbs * spec.seq
    counts: Dict[Tuple[str, Optional[str]], int] = {}
    for j, i in enumerate(layer_ids):
        if block is None:
            rc = recompute
        else:
            rc = "full" if j < block else (None if recompute == "full" else recompute)
        key = ("moe" if spec.is_moe(i) else "dense", rc)
        counts[key] = counts.get(key, 0) + 1
    for (kind, rc), n in counts.items():
        t = cm.recompute_time(group, spec, kind, mbs, tp, ep) if rc == "full" else cm.compute_time(
            group, spec, kind, mbs, tp, ep)
        fwd += n * t.fwd
        bwd += n * t.bwd
        if rc == "selective":
            bwd += n * t.fwd * 0.1  # attention core only
        act += n * tokens * _act_per_token(spec, group, kind, tp, rc)
    if first:
        t = cm.compute_time(group, spec, "embed", mbs, tp)
        fwd, bwd = fwd + t.fwd, bwd + t.bwd
        act += tokens * spec.hidden * spec.param_bytes / (tp if spec.sequence_parallel and tp > 1 else 1)
    if last:
        t = cm.compute_time(group, spec, "head", mbs, tp)
        fwd, bwd = fwd + t.fwd, bwd + t.bwd
        act += tokens * _head_per_token(spec, group, tp)
    # A shard timed with its peers includes its TP and EP collectives: charge only the others' from the
    # link model (cost_model.shard_measured).
    unmeasured = [i for i in layer_ids if not cm.shard_measured(group, "moe" if spec.is_moe(i) else "dense", tp, ep)]
    comm = cm.tp_comm_time(spec, group, links, mbs, tp, len(unmeasured)) + cm.ep_comm_time(
        spec, group, links, mbs, tp, ep, sum(1 for i in unmeasured if spec.is_moe(i)))
    return fwd + comm / 2, bwd + comm / 2, act


def _act_per_token(spec, group, kind, tp, recompute) -> float:
    prof = group.profile
    if prof is not None:
        measured = prof.activation_bytes(kind, recompute)
        if measured is not None:
            return measured / tp
    return cm.activation_bytes_per_token(spec, kind == "moe", tp, recompute)


def _head_per_token(spec, group, tp) -> float:
    prof = group.profile
    if prof is not None:
        measured = prof.activation_bytes("head", None)
        if measured is not None:
            return measured / tp
    return cm.head_bytes_per_token(spec, tp)


def _simulate(pipe, ranges, spec, groups, links, options, ep, dp, expert_dp, keep_timeline, blocks=None):
    p, v = len(ranges), len(ranges[0])
    mbs, m = pipe["micro_batch_size"], pipe["micro_batches"]
    fwd_t = [[0.0] * v for _ in range(p)]
    bwd_t = [[0.0] * v for _ in range(p)]
    acts = [[0.0] * v for _ in range(p)]
    for r, stage in enumerate(pipe["stages"]):
        g, tp = groups[stage["group"]], int(stage["tensor_parallel"])
        for c, rng in enumerate(ranges[r]):
            first, last = r == 0 and c == 0, r == p - 1 and c == v - 1
            fwd_t[r][c], bwd_t[r][c], acts[r][c] = _chunk_cost(spec, g, links, list(rng), first, last, mbs, tp, ep,
                                                               options.recompute, None if blocks is None else blocks[r])
    sgroups = [groups[s["group"]] for s in pipe["stages"]]
    tps = [int(s["tensor_parallel"]) for s in pipe["stages"]]
    same_node = sum(tps) <= min(g.devices_per_node for g in sgroups) and len({g.name for g in sgroups}) == 1

    def transfer(src: int, dst: int, _direction: str) -> float:
        a, b = sgroups[src], sgroups[dst]
        kind = links.between(a, b, same_node=same_node)
        nbytes = cm.p2p_bytes(spec, mbs) / (tps[src] if spec.sequence_parallel and tps[src] > 1 else 1)
        return links.time(kind, nbytes)

    if m > 0:
        actions = pipeline_schedule(p, m, v)
        res = simulate_pipeline(actions, lambda r, c, _mb: fwd_t[r][c], lambda r, c, _mb: bwd_t[r][c], transfer)
    else:  # a replica given no micro-batches idles
        actions = [[] for _ in range(p)]
        res = PipelineResult(0.0, [0.0] * p, [0.0] * p, [[] for _ in range(p)])
    stages = []
    for r, stage in enumerate(pipe["stages"]):
        g, tp = groups[stage["group"]], int(stage["tensor_parallel"])
        layer_ids = [i for rng in ranges[r] for i in rng]
        count = cm.stage_params(spec, layer_ids, tp, ep, r == 0, r == p - 1, p)
        mem = cm.state_bytes(spec, count, dp, expert_dp, options.distributed_optimizer)
        mem.activations = inflight_peak(actions[r], acts[r]) if m > 0 else 0.0
        recomputes = (blocks[r] > 0) if blocks is not None else options.recompute == "full"
        if recomputes and layer_ids:
            # Backward of a recomputed layer rebuilds its full activations for one micro-batch.
            moe = any(spec.is_moe(i) for i in layer_ids)
            mem.activations += mbs * spec.seq * _act_per_token(spec, g, "moe" if moe else "dense", tp, None)
        if any(spec.is_moe(i) for i in layer_ids):
            mem.buffers += cm.moe_buffer_bytes(spec, mbs * spec.seq)
        mem.reserved = g.reserved_gb * cm.GB
        inflight = int(inflight_peak(actions[r], [1.0] * v)) if m > 0 else 0
        stages.append(StageCost(g.name, tp, len(layer_ids), sum(fwd_t[r]), sum(bwd_t[r]), mem, inflight))
    if not keep_timeline:
        res.timeline = []
    return res, stages


def _group_stats(plan, spec, groups, ranges, step, mem_by_group) -> Dict[str, Dict[str, float]]:
    """Per group: devices used, worst-rank memory (GB), achieved model TFLOP/s per device and MFU."""
    flops: Dict[str, float] = {}
    used: Dict[str, int] = {}
    p = len(ranges)
    stage_flops = []  # training FLOPs per token of each stage (the same in every pipeline)
    for k in range(p):
        f = sum(3.0 * cm.layer_flops(spec, spec.is_moe(i)) for rng in ranges[k] for i in rng)
        stage_flops.append(f + (3.0 * cm.head_flops(spec) if k == p - 1 else 0.0))
    for pipe in plan["pipelines"]:
        tokens = pipe["micro_batch_size"] * pipe["micro_batches"] * spec.seq
        for k, s in enumerate(pipe["stages"]):
            flops[s["group"]] = flops.get(s["group"], 0.0) + stage_flops[k] * tokens
            used[s["group"]] = used.get(s["group"], 0) + int(s["tensor_parallel"])
    out = {}
    for name, g in groups.items():
        n = used.get(name, 0)
        tflops = flops.get(name, 0.0) / step / n / 1e12 if n and step else 0.0
        out[name] = {"devices": g.devices, "devices_used": n, "memory_gb": round(mem_by_group.get(name, 0.0) / cm.GB, 4),
                     "memory_limit_gb": g.memory_gb, "tflops": round(tflops, 4),
                     "mfu": round(tflops / g.peak_tflops, 4) if g.peak_tflops else 0.0}
    return out
