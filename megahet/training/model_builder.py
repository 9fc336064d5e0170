"""Build this rank's model chunks (pipeline stage, virtual stages) from the config."""
from __future__ import annotations

from typing import List

import torch

from megahet.config import MegahetConfig
from megahet.models.gpt import GPTModel
from megahet.models.transformer import is_moe_layer
from megahet.parallel.context import ParallelContext
from megahet.parallel.pipeline import recompute_units, stage_layer_ranges


def params_dtype(cfg: MegahetConfig, backend=None) -> torch.dtype:
    """The dtype this rank's stage computes in: --bf16/--fp16, except that a backend declaring no bf16
    support (Backend.supports_bf16) computes in fp32; other stages keep bf16 (plans mix vendors)."""
    if cfg.train.bf16:
        if backend is not None and not backend.supports_bf16:
            return torch.float32
        return torch.bfloat16
    if cfg.train.fp16:
        return torch.float16
    return torch.float32


def build_moe_tracker(cfg: MegahetConfig):
    """Router statistics and aux-loss scaling shared by this rank's MoE layers (None for dense models)."""
    m = cfg.model
    if not m.num_experts:
        return None
    from megahet.moe.tracker import MoETracker
    ids = [i for i in range(m.num_layers) if is_moe_layer(m, i)]
    return MoETracker(m.num_layers, ids, m.num_experts)


def build_model_chunks(cfg: MegahetConfig, ctx: ParallelContext, vocab_size: int, padded_vocab_size: int,
                       moe_tracker=None) -> List[GPTModel]:
    """One GPTModel per model chunk this pipeline rank holds (several with the interleaved schedule)."""
    ranges = stage_layer_ranges(cfg, ctx.pp_rank)
    plan = ctx.plan
    block = plan.recompute_layers[ctx.pp_rank] if plan is not None and plan.recompute_layers is not None else None
    units = recompute_units(cfg, ranges, block)  # a plan's per-stage recompute counts win over the flags
    chunks = []
    for c, layers in enumerate(ranges):
        chunks.append(GPTModel(
            cfg.model, ctx, layer_ids=layers, pre_process=ctx.is_first_stage and c == 0,
            post_process=ctx.is_last_stage and c == len(ranges) - 1, vocab_size=vocab_size,
            padded_vocab_size=padded_vocab_size, sequence_parallel=cfg.parallel.sequence_parallel,
            seed=cfg.train.seed, dtype=params_dtype(cfg, ctx.backend), recompute=cfg.train.recompute_granularity,
            recompute_units=units, moe_tracker=moe_tracker))
    if cfg.train.compile:
        from megahet.compile import compile_layers
        compile_layers(chunks, ctx.device)
    return chunks
