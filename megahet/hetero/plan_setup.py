"""From the config to a validated plan: --plan FILE, the planner's choice (--cluster without --plan or
layout flags), or the uniform plan the parallel flags describe.

One code path: either way the runtime gets a Plan and its rank assignment. A plan file also sets the
config's pipeline fields (stage count, layers per stage, virtual stages), so everything that reads
them (model builder, schedule choice, checkpoint metadata) agrees with the plan.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from megahet.config import MegahetConfig, validate_world
from megahet.errors import MegahetError
from megahet.hetero.autoplan import choose_plan, layout_flags_given
from megahet.hetero.cluster import ClusterSpec, load_cluster
from megahet.hetero.plan import Plan, load_plan, single_group_cluster
from megahet.parallel.pipeline import virtual_stages
from megahet.parallel.pipeline_layout import layers_per_stage


def build_plan(cfg: MegahetConfig, world_size: int,
               cluster: Optional[ClusterSpec] = None) -> Tuple[Plan, ClusterSpec, List[List[List[int]]]]:
    """(plan, cluster, rank assignment) for this job; raises MegahetError with a one-line fix.

    `cluster`: the spec to run on instead of --cluster's (--elastic: the groups still present).
    """
    p, t, m = cfg.parallel, cfg.train, cfg.model
    planned_cluster = cluster is not None or bool(cfg.hetero.cluster)
    if cluster is None and cfg.hetero.cluster:
        cluster = load_cluster(cfg.hetero.cluster)
    elif cluster is None:
        from megahet.device import default_backend_name
        cluster = single_group_cluster(world_size, cfg.hetero.backend or default_backend_name())
    if cfg.hetero.plan:
        plan = load_plan(cfg.hetero.plan)
        apply_plan_to_config(cfg, plan)
    elif planned_cluster and not layout_flags_given(cfg):
        # --cluster without --plan or layout flags: the planner chooses (every local rank gets the same plan
        # from the same cached profile; see hetero/autoplan.py).
        plan = choose_plan(cfg, cluster)
        apply_plan_to_config(cfg, plan)
    else:
        validate_world(cfg, world_size)
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        dp = world_size // (tp * pp)
        vpp = virtual_stages(cfg)
        ranges = layers_per_stage(m.num_layers, pp, vpp, p.pipeline_layers)
        layers = [sum(len(r) for r in chunks) for chunks in ranges]
        plan = Plan.uniform(tp, pp, dp, layers, t.micro_batch_size, t.global_batch_size // (t.micro_batch_size * dp),
                            virtual_stages=vpp, expert_parallel=p.expert_model_parallel_size, cluster=cluster)
        if any(n % vpp for n in layers):  # --pipeline-layers per virtual stage: the config keeps the split
            return plan, cluster, _validate(dataclasses.replace(plan, virtual_stages=1), cfg, cluster, world_size)
    return plan, cluster, _validate(plan, cfg, cluster, world_size)


def _validate(plan: Plan, cfg: MegahetConfig, cluster, world_size: int):
    m, p = cfg.model, cfg.parallel
    divides = {"--ffn-hidden-size": m.ffn_hidden_size}
    if m.num_experts:
        divides["--moe-ffn-hidden-size"] = m.moe_ffn_hidden_size
    return plan.validate(cluster, m.num_layers, cfg.train.global_batch_size, world_size,
                         num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                         num_experts=m.num_experts, seq_length=m.seq_length,
                         sequence_parallel=p.sequence_parallel, tp_divides=divides)


def apply_plan_to_config(cfg: MegahetConfig, plan: Plan) -> None:
    """Make the config's pipeline fields describe the plan (its stages and layer split, and its
    per-stage recompute: full, block method, the counts read from the plan by the model builder)."""
    p, m = cfg.parallel, cfg.model
    if plan.recompute_layers is not None:
        cfg.train.recompute_granularity, cfg.train.recompute_method = "full", "block"
    p.pipeline_model_parallel_size = plan.num_stages
    p.pipeline_layers = list(plan.layers) if plan.num_stages > 1 else None
    p.expert_model_parallel_size = plan.expert_parallel
    if plan.virtual_stages > 1:
        chunks = plan.num_stages * plan.virtual_stages
        if m.num_layers % chunks:
            raise MegahetError(f"plan virtual_stages {plan.virtual_stages} needs --num-layers {m.num_layers} divisible "
                               f"by stages x virtual_stages = {chunks}; change the plan or the layer count")
        p.num_layers_per_virtual_pipeline_stage = m.num_layers // chunks
    else:
        p.num_layers_per_virtual_pipeline_stage = None
