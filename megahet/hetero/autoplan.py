"""Plan a job from its config and cluster spec: what `tools/plan.py` and `--cluster` without `--plan` run.

Backends present here (cpu, and sim which is CPU compute) are profiled once per model shape (cached);
other devices are costed from FLOPs and their spec. Layout flags fix that part of the search.

When every rank of the cluster is a cpu/sim rank here and there are 2+ of them, gloo's links are
measured too (profile.load_or_measure_links, cached) for the link kinds the spec does not set. What a
cpu/sim rank holds outside the model (process_memory.runtime_overhead, ~80 MB here) is charged as
Profile.reserved_bytes: always by tools/plan.py (it reports memory per rank); at job start when it is
cached, or when the chosen plan leaves a cpu/sim rank less than RESERVED_MARGIN_GB (then measured
once and planned again): the probe costs ~4-6 s the first time per model shape, and a charge smaller
than the margin cannot change a plan that has the margin to spare (it only removes plans).
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megahet.hetero import cost_model as cm
from megahet.hetero.planner import Constraints, Result, Settings, cluster_groups, search

log = logging.getLogger("megahet")

_PROFILED = ("cpu", "sim")
# Job start measures the process overhead (~0.08 GB here) only for a plan with less headroom than this
# on some cpu/sim rank (12x the measured figure: other hosts' libraries and thread counts hold more).
RESERVED_MARGIN_GB = 1.0


def params_dtype(cfg) -> torch.dtype:
    return torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else torch.float32


def local_threads(cluster) -> int:
    """Threads each local rank gets (the launcher splits this host's cores over its ranks)."""
    local = sum(g.devices for g in cluster.groups if g.backend in _PROFILED) or 1
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit():
        return max(1, int(env))
    return max(1, (os.cpu_count() or 1) // local)


def local_speeds(cluster) -> List[Tuple[str, float]]:
    """(group, speed) of each cpu/sim rank of the cluster spec in rank order: the ranks the launcher
    starts on this host (1.0 for cpu)."""
    return [(g.name, 1.0 if g.backend != "sim" else float(g.speed or 1.0))
            for g in cluster.groups if g.backend in _PROFILED for _ in range(g.devices)]


def measure_profiles(cfg, cluster, *, progress=None, vocab_size: Optional[int] = None):
    """What `cluster_groups` takes for the cluster's cpu/sim groups: None when there are none; the CPU
    profile when one rank is local (a sim group scales it by its speed); else {group: its own profile},
    every local rank measured at the same time, as the job will run them (profile.load_or_measure_together)."""
    ranks = local_speeds(cluster)
    if not ranks:
        return None
    from megahet.hetero.profile import load_or_measure, load_or_measure_together
    kw = dict(threads=local_threads(cluster), micro_batch_sizes=(1, 2, 4), progress=progress,
              vocab_size=vocab_size or cfg.model.vocab_size or 32000)
    if len(ranks) == 1:
        return load_or_measure(cfg.model, params_dtype(cfg), backend="cpu", **kw)
    out = first_per_group(ranks, load_or_measure_together(cfg.model, params_dtype(cfg), [s for _, s in ranks], **kw))
    _add_shards(cfg, cluster, ranks, out, kw)
    return out


def first_per_group(ranks: List[Tuple[str, float]], per_rank) -> Dict[str, object]:
    """{group: what its first rank measured} from one result per local rank (local_speeds' order)."""
    out: Dict[str, object] = {}
    for (group, _), value in zip(ranks, per_rank):
        out.setdefault(group, value)
    return out


def add_shards(cfg, ranks, profiles: Dict[str, object], tp: int, ep: int = 1, **kw) -> None:
    """Time the local ranks' TP-`tp` / EP-`ep` shards with their peers (profile.load_or_measure_shards_together)
    and add them to each group's profile; nothing when the ranks do not split into blocks of one speed
    (those keep the derived estimate: a layer's time / tp plus the link model, which missed 20-35% of a
    TP stage here)."""
    from megahet.hetero.profile import load_or_measure_shards_together
    shards = load_or_measure_shards_together(cfg.model, params_dtype(cfg), [s for _, s in ranks], tp, ep,
                                             sequence_parallel=cfg.parallel.sequence_parallel, **kw)
    for group, times in first_per_group(ranks, shards or []).items():
        profiles[group].times.update(times)


def _add_shards(cfg, cluster, ranks, profiles, kw) -> None:
    """add_shards for each TP x EP the search can give the local groups: TP a power of two dividing the
    heads, EP (MoE models) a power of two dividing the experts, their product up to the largest group."""
    largest = max(g.devices for g in cluster.groups if g.backend in _PROFILED)

    def powers(limit: int, divides: int) -> List[int]:
        out = [1]
        while out[-1] * 2 <= limit and divides % (out[-1] * 2) == 0:
            out.append(out[-1] * 2)
        return out

    for tp in powers(largest, cfg.model.num_attention_heads):
        for ep in powers(largest // tp, cfg.model.num_experts or 1):
            if tp * ep > 1:
                add_shards(cfg, ranks, profiles, tp, ep, **kw)


def profile_for(cfg, cluster, *, measure: bool = True, progress=None, vocab_size: Optional[int] = None):
    """measure_profiles, or None when measure=False."""
    if not measure:
        return None
    return measure_profiles(cfg, cluster, progress=progress, vocab_size=vocab_size)


def measured_links(cluster, *, progress=None) -> Dict[str, List[float]]:
    """gloo's figures measured here ("kind" / "kind/op" -> [bytes/s, s], cached) when every rank of the
    cluster is a cpu/sim rank on this host and there are 2+ of them; else {}. Link kinds are not per
    backend in the cost model, so a cluster with GPU/NPU groups keeps its spec's or the default figures
    (gloo's would replace NVLink's); one local rank exchanges nothing."""
    ranks = local_speeds(cluster)
    if len(ranks) < 2 or any(g.backend not in _PROFILED for g in cluster.groups):
        return {}
    from megahet.hetero.profile import load_or_measure_links
    return load_or_measure_links(len(ranks), local_threads(cluster), progress=progress)


def job_links(cluster, measured: Dict[str, List[float]]) -> cm.Links:
    """The cluster spec's links, measured figures for the kinds it does not set, defaults for the rest."""
    return cm.Links.from_cluster(cluster.links).apply_measured(measured, cluster.links)


def _set_reserved(prof, nbytes: float) -> None:
    for p in (prof.values() if isinstance(prof, dict) else [prof]):
        p.reserved_bytes = float(nbytes)


def _overhead(cfg, progress=None) -> float:
    from megahet.hetero.process_memory import cached_overhead, runtime_overhead
    hit = cached_overhead(cfg)
    if hit is not None:
        return hit
    if progress:
        progress(0, 1, "process memory: one-layer probe")
    out = runtime_overhead(cfg)
    if progress:
        progress(1, 1, "process memory: one-layer probe")
    return out


def _short_of_memory(groups: Dict[str, cm.GroupSpec], pred) -> bool:
    """Whether the plan leaves some cpu/sim rank less than RESERVED_MARGIN_GB of its memory."""
    used = {n: pred.groups.get(n, {}).get("memory_gb", 0.0) for n in groups}
    return any(g.backend in _PROFILED and g.memory_gb - used[n] < RESERVED_MARGIN_GB for n, g in groups.items())


def constraints_from_flags(given: Dict[str, object], cfg) -> Constraints:
    """Constraints from the layout flags the user gave explicitly (`given`: field name -> value)."""
    c = Constraints()
    c.tp = given.get("tensor_model_parallel_size")
    c.pp = given.get("pipeline_model_parallel_size")
    c.ep = given.get("expert_model_parallel_size")
    c.dp = given.get("data_parallel_size")
    c.micro_batch_size = given.get("micro_batch_size")
    if given.get("pipeline_layers"):
        c.pipeline_layers = [int(x) for x in cfg.parallel.pipeline_layers]
    per_virtual = given.get("num_layers_per_virtual_pipeline_stage")
    if per_virtual and c.pp:
        c.virtual_stages = max(1, cfg.model.num_layers // c.pp // int(per_virtual))
    if "recompute_granularity" in given:
        c.recompute = given["recompute_granularity"]
    return c


def plan_job(cfg, cluster, given: Optional[Dict[str, object]] = None, *, measure: bool = True,
             progress: Optional[Callable] = None, vocab_size: Optional[int] = None,
             settings: Optional[Settings] = None, layout: Optional[str] = None, allow_idle: bool = False,
             flash_attention: bool = True) -> Result:
    """Search the best plan for `cfg` on `cluster`; MegahetError when nothing fits."""
    prof = profile_for(cfg, cluster, measure=measure, progress=progress, vocab_size=vocab_size)
    spec = cm.ModelSpec.from_config(cfg, vocab_size)
    if not flash_attention:
        spec = replace(spec, flash_attention=False)
    if prof is not None:
        _set_reserved(prof, _overhead(cfg, progress))  # the report shows memory per rank: always charged
    groups = cluster_groups(cluster, prof)
    links = job_links(cluster, measured_links(cluster, progress=progress) if measure else {})
    s = settings or Settings(distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                             overlap_grad_reduce=cfg.parallel.overlap_grad_reduce, use_all_devices=not allow_idle)
    c = constraints_from_flags(given or {}, cfg)
    c.layout = layout
    return search(spec, groups, links, cfg.train.global_batch_size, c, s)


# -- auto-planning at training start ----------------------------------------------------------------
_DEFAULTS = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1,
             "pipeline_layers": None, "num_layers_per_virtual_pipeline_stage": None}


def search_uniform(spec: cm.ModelSpec, groups, links, cluster, gbs: int, fixed: Dict[str, object],
                   settings: Settings):
    """Best layout the uniform flags can express on `cluster` (ranks in megahet's grid order over the
    cluster spec): TP, PP, EP, layers per stage (uneven), micro-batch size, virtual stages, recompute.

    Returns (plan dict, Prediction, recompute). Every pipeline gets the same micro-batches here; the
    per-replica plans of the planner need the plan-driven runtime (--plan).
    """
    from megahet.hetero.plan import Plan
    from megahet.hetero.planner import _partition_exact, _RECOMPUTE
    from megahet.hetero.predict import Options, predict
    from megahet.errors import MegahetError
    world = sum(g.devices for g in cluster.groups)
    owner = [g.name for g in cluster.groups for _ in range(g.devices)]
    best = None
    tps = [fixed["tensor_model_parallel_size"]] if "tensor_model_parallel_size" in fixed else \
        [t for t in (1, 2, 4, 8) if world % t == 0 and spec.check_tp(t) is None]
    pps = [fixed["pipeline_model_parallel_size"]] if "pipeline_model_parallel_size" in fixed else \
        list(range(1, spec.num_layers + 1))
    rcs = [fixed["recompute_granularity"]] if "recompute_granularity" in fixed else list(_RECOMPUTE)
    for tp in tps:
        for pp in pps:
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            eps = [fixed["expert_model_parallel_size"]] if "expert_model_parallel_size" in fixed else \
                ([e for e in range(1, dp + 1) if dp % e == 0 and spec.num_experts % e == 0] if spec.num_experts
                 else [1])
            mbss = [fixed["micro_batch_size"]] if "micro_batch_size" in fixed else list(settings.micro_batch_sizes)
            for mbs in mbss:
                if gbs % (mbs * dp):
                    continue
                m = gbs // (mbs * dp)
                probe = Plan.uniform(tp, pp, dp, [1] * pp, mbs, m, cluster=cluster).to_dict()
                if any(len({owner[r] for r in s["ranks"]}) > 1 for p in probe["pipelines"] for s in p["stages"]):
                    continue  # a TP group would span two device groups
                for ep in eps:
                    for rc in rcs:
                        for v in _uniform_vpps(fixed, spec, pp, m):
                            try:
                                layers = fixed.get("pipeline_layers") or _uniform_layers(
                                    probe, spec, groups, links, mbs, tp, ep, rc, v)
                                plan = Plan.uniform(tp, pp, dp, layers, mbs, m, virtual_stages=v, expert_parallel=ep,
                                                    cluster=cluster).to_dict()
                                pred = predict(plan, spec, groups, links,
                                               Options(rc, settings.distributed_optimizer, settings.overlap_grad_reduce))
                            except MegahetError:
                                continue
                            if pred.feasible and (best is None or pred.step_time_s < best[1].step_time_s):
                                best = (plan, pred, rc)
                        if best is not None and best[2] == rc:
                            break
    if best is None:
        raise MegahetError(f"no layout of the {world} ranks in {getattr(cluster, 'source', 'the cluster spec')} fits "
                           f"the model in memory; pass --plan, or use a smaller model")
    return best


def _uniform_vpps(fixed, spec, pp, m):
    if "num_layers_per_virtual_pipeline_stage" in fixed:
        return [max(1, spec.num_layers // pp // int(fixed["num_layers_per_virtual_pipeline_stage"]))]
    out = [1]
    if pp > 1 and m % pp == 0 and m >= pp:
        out += [v for v in (2, 3, 4) if spec.num_layers % (pp * v) == 0]
    return out


def _uniform_layers(probe, spec, groups, links, mbs, tp, ep, rc, v):
    """Layers per stage balancing the slowest pipeline's stages (exact DP; multiples of v)."""
    from megahet.hetero.planner import _Costs, _partition_exact
    costs = _Costs(spec, groups, links)
    pp = len(probe["layers"])
    per = []
    for k in range(pp):
        lay = [costs.layer(p["stages"][k]["group"], mbs, tp, ep, rc) for p in probe["pipelines"]]
        per.append(max(lay, key=lambda x: x[0]))
    times = [x[0] for x in per]
    extra = [0.0] * pp
    extra[0] += per[0][3][0]
    extra[-1] += per[-1][3][2]
    if v == 1:
        return _partition_exact(lambda j, a, b: (b - a) * times[j] + extra[j], pp, spec.num_layers)
    units = _partition_exact(lambda j, a, b: (b - a) * v * times[j] + extra[j], pp, spec.num_layers // v)
    return [u * v for u in units]


def _once(fn, *args):
    """fn(*args) under this host's auto-planning lock: the first local rank measures (and caches), the
    others wait for it and read the cache."""
    import fcntl
    from megahet.hetero.profile import cache_dir
    os.makedirs(cache_dir(), exist_ok=True)
    with open(os.path.join(cache_dir(), ".auto.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return fn(*args)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _log_progress(done: int, total: int, label: str) -> None:
    if done == 0:
        log.info("megahet: measuring %s (first time; cached afterwards)", label)


def _measure_once(cfg, cluster):
    """(profiles, measured links) every local rank reads, measured once per host (see _once)."""
    if not any(g.backend in _PROFILED for g in cluster.groups):
        return None, {}
    return _once(lambda: (measure_profiles(cfg, cluster), measured_links(cluster, progress=_log_progress)))


def _plan_charging_reserved(cfg, cluster, prof, plan):
    """plan(groups) -> (result, Prediction), with the process overhead charged on cpu/sim ranks when it
    is cached, or when the plan is short of memory without it (then measured once and planned again)."""
    from megahet.hetero.process_memory import cached_overhead
    reserved = cached_overhead(cfg) if prof is not None else None
    if reserved is not None:
        _set_reserved(prof, reserved)
    groups = cluster_groups(cluster, prof)
    out = plan(groups)
    if reserved is None and prof is not None and _short_of_memory(groups, out[1]):
        _set_reserved(prof, _once(_overhead, cfg, _log_progress))
        out = plan(cluster_groups(cluster, prof))
    return out


def auto_layout(cfg, cluster, vocab_size: Optional[int] = None) -> dict:
    """Choose the layout for `--cluster` without `--plan` and write it into `cfg` (every rank computes
    the same answer from the same cached profile). Layout flags that differ from their defaults stay
    fixed. Returns the chosen plan dict (with `predicted`)."""
    p, t = cfg.parallel, cfg.train
    fixed: Dict[str, object] = {k: getattr(p, k) for k, d in _DEFAULTS.items() if getattr(p, k) != d}
    if t.recompute_granularity is not None:
        fixed["recompute_granularity"] = t.recompute_granularity
    prof, measured = _measure_once(cfg, cluster)
    spec = cm.ModelSpec.from_config(cfg, vocab_size)
    links = job_links(cluster, measured)
    settings = Settings(distributed_optimizer=p.use_distributed_optimizer, overlap_grad_reduce=p.overlap_grad_reduce)

    def plan_on(groups):
        best = search_uniform(spec, groups, links, cluster, t.global_batch_size, fixed, settings)
        return best, best[1]

    (plan, pred, rc), _ = _plan_charging_reserved(cfg, cluster, prof, plan_on)
    tp = plan["pipelines"][0]["stages"][0]["tensor_parallel"]
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, len(plan["layers"])
    p.expert_model_parallel_size = plan["expert_parallel"]
    p.pipeline_layers = list(plan["layers"]) if len(plan["layers"]) > 1 else None
    v = plan["virtual_stages"]
    p.num_layers_per_virtual_pipeline_stage = plan["layers"][0] // v if v > 1 else None
    t.micro_batch_size = plan["pipelines"][0]["micro_batch_size"]
    t.recompute_granularity = rc
    if rc == "full" and t.recompute_method is None:
        t.recompute_method = "uniform"
    plan["predicted"] = {"step_time_s": round(pred.step_time_s, 6), "tokens_per_s": round(pred.tokens_per_s, 3)}
    log.info("megahet: auto plan for %s: tp=%d pp=%d ep=%d layers=%s micro-batch %d, virtual stages %d, "
             "recompute %s; predicted %.3f s/step", cfg.hetero.cluster, tp, len(plan["layers"]), plan["expert_parallel"],
             plan["layers"], t.micro_batch_size, v, rc or "none", pred.step_time_s)
    return plan


def layout_flags_given(cfg) -> bool:
    """True when the user gave any layout flag (command line, YAML or overrides), even one equal to its
    default: `--tensor-model-parallel-size 1` asks for TP 1, not for the planner. A config not made by
    `build_config` (no record of what was given) counts flags away from their defaults."""
    given = getattr(cfg, "explicit_fields", None)
    if given is not None:
        return any(k in given for k in _DEFAULTS)
    p = cfg.parallel
    return any(getattr(p, k) != d for k, d in _DEFAULTS.items())


def plan_at_start(cfg, cluster) -> Result:
    """The planner's Result for `--cluster` without `--plan` (every device used): profiles and links
    measured once per host and cached, the process overhead charged as the module docstring says."""
    p, t = cfg.parallel, cfg.train
    prof, measured = _measure_once(cfg, cluster)
    vocab = cfg.model.vocab_size or (cfg.data.builtin_vocab_size if not cfg.data.tokenizer_model else None)
    spec = cm.ModelSpec.from_config(cfg, vocab)
    links = job_links(cluster, measured)
    settings = Settings(distributed_optimizer=p.use_distributed_optimizer, overlap_grad_reduce=p.overlap_grad_reduce)
    c = Constraints()
    if t.recompute_granularity is not None:
        c.recompute = t.recompute_granularity

    def plan_on(groups):
        found = search(spec, groups, links, t.global_batch_size, replace(c), settings)
        return found, found.prediction

    return _plan_charging_reserved(cfg, cluster, prof, plan_on)[0]


def choose_plan(cfg, cluster):
    """The planner's plan for `--cluster` without `--plan` (a runtime Plan, every device used).

    Every local rank calls this and gets the same plan: the profile and links are measured once under
    a file lock and read from the cache by the others. Applies the chosen recompute to `cfg`.
    """
    from megahet.hetero.plan import Plan
    t = cfg.train
    res = plan_at_start(cfg, cluster)
    if res.options.recompute != t.recompute_granularity:
        t.recompute_granularity = res.options.recompute
        if t.recompute_granularity == "full" and t.recompute_method is None:
            t.recompute_method = "uniform"
    log.info("megahet: planned %s (virtual stages %d, layers %s); predicted %.3f s/step, %.0f tokens/s",
             res.candidate.describe(), res.plan["virtual_stages"], res.plan["layers"], res.prediction.step_time_s,
             res.prediction.tokens_per_s)
    return Plan.from_dict(res.plan, "planned plan")
