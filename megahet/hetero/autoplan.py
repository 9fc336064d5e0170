"""Plan a job from its config and cluster spec: what `tools/plan.py` and `--cluster` without `--plan` run.

Backends present here (cpu, and sim which is CPU compute) are profiled once per model shape (cached);
other devices are costed from FLOPs and their spec. Layout flags fix that part of the search.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Callable, Dict, Optional

import torch

from megahet.hetero import cost_model as cm
from megahet.hetero.planner import Constraints, Result, Settings, cluster_groups, search

log = logging.getLogger("megahet")

_PROFILED = ("cpu", "sim")


def params_dtype(cfg) -> torch.dtype:
    return torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else torch.float32


def local_threads(cluster) -> int:
    """Threads each local rank gets (the launcher splits this host's cores over its ranks)."""
    local = sum(g.devices for g in cluster.groups if g.backend in _PROFILED) or 1
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit():
        return max(1, int(env))
    return max(1, (os.cpu_count() or 1) // local)


def profile_for(cfg, cluster, *, measure: bool = True, progress=None, vocab_size: Optional[int] = None):
    """The CPU profile for the cluster's cpu/sim groups (None when there are none or measure=False)."""
    if not measure or not any(g.backend in _PROFILED for g in cluster.groups):
        return None
    from megahet.hetero.profile import load_or_measure
    return load_or_measure(cfg.model, params_dtype(cfg), backend="cpu", threads=local_threads(cluster),
                           vocab_size=vocab_size or cfg.model.vocab_size or 32000, progress=progress)


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
    groups = cluster_groups(cluster, prof)
    links = cm.Links.from_cluster(cluster.links)
    if prof is not None and prof.links:
        for kind, (bw, lat) in prof.links.items():
            if kind not in (cluster.links or {}):
                links.bandwidth[kind], links.latency[kind] = bw, lat
    s = settings or Settings(distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                             overlap_grad_reduce=cfg.parallel.overlap_grad_reduce, use_all_devices=not allow_idle)
    c = constraints_from_flags(given or {}, cfg)
    c.layout = layout
    return search(spec, groups, links, cfg.train.global_batch_size, c, s)
