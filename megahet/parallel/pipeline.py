"""Pipeline stages: which layers a rank holds, and one step's forward/backward over micro-batches.

The schedule (a list of actions per rank, `schedules.py`) decides the order; this module supplies what
a forward and a backward of one micro-batch on one model chunk mean, and runs the executor.
Pipeline size 1 goes through the same code (a schedule without communication).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from megahet.config import MegahetConfig
from megahet.errors import MegahetError
from megahet.parallel.context import ParallelContext
from megahet.parallel.boundary import StageP2P
from megahet.parallel import wait_clock
from megahet.parallel.pipeline_layout import layers_per_stage
from megahet.parallel.schedule_executor import execute_schedule
from megahet.parallel.schedules import Action, build_schedule

log = logging.getLogger("megahet")


def virtual_stages(cfg: MegahetConfig) -> int:
    """Model chunks per rank (interleaved schedule), from --num-layers-per-virtual-pipeline-stage."""
    p, m = cfg.parallel, cfg.model
    if not p.num_layers_per_virtual_pipeline_stage:
        return 1
    if p.pipeline_model_parallel_size == 1:
        raise MegahetError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
    total = m.num_layers // p.num_layers_per_virtual_pipeline_stage
    if m.num_layers % p.num_layers_per_virtual_pipeline_stage or total % p.pipeline_model_parallel_size:
        raise MegahetError(f"--num-layers {m.num_layers} must split into virtual stages of "
                           f"--num-layers-per-virtual-pipeline-stage {p.num_layers_per_virtual_pipeline_stage} "
                           f"that divide evenly over {p.pipeline_model_parallel_size} pipeline stages")
    return total // p.pipeline_model_parallel_size


def stage_layer_ranges(cfg: MegahetConfig, pp_rank: int) -> List[range]:
    """Global layer ranges of this pipeline rank's model chunks."""
    p = cfg.parallel
    vpp = virtual_stages(cfg)
    return layers_per_stage(cfg.model.num_layers, p.pipeline_model_parallel_size, vpp, p.pipeline_layers)[pp_rank]


def recompute_units(cfg: MegahetConfig, ranges: Sequence[range], block: Optional[int] = None) -> List[List[int]]:
    """Groups of consecutive layers recomputed together under --recompute-granularity full (Megatron).

    uniform: each chunk's layers in units of --recompute-num-layers (only each unit's input is kept);
    block: the first --recompute-num-layers layers of each chunk, one layer per unit, the rest not at all.
    `block` (a plan's per-stage recompute count for this stage) replaces --recompute-num-layers there.
    """
    t = cfg.train
    if t.recompute_granularity != "full":
        return []
    if block is not None:
        return [[i] for r in ranges for i in list(r)[:block]]
    n = max(1, t.recompute_num_layers)
    units: List[List[int]] = []
    for r in ranges:
        ids = list(r)
        if t.recompute_method == "uniform":
            units += [ids[i:i + n] for i in range(0, len(ids), n)]
        else:
            units += [[i] for i in ids[:n]]
    return units


def schedule_name(cfg: MegahetConfig, num_microbatches: int) -> str:
    name = cfg.parallel.pipeline_schedule
    if name != "auto":
        return name
    if virtual_stages(cfg) > 1:
        return "interleaved"
    return "1f1b" if num_microbatches >= cfg.parallel.pipeline_model_parallel_size else "afab"


@dataclass
class StepOutput:
    """What one forward/backward over a replica's micro-batches produced (loss sums on the last stage)."""
    loss_sum: torch.Tensor  # fp32 scalar: sum of per-token loss * mask over this replica's micro-batches


def forward_backward(model_chunks: List[torch.nn.Module], microbatches: List[Dict[str, torch.Tensor]],
                     ctx: ParallelContext, *, global_tokens: float, schedule: str = "1f1b",
                     loss_scale: float = 1.0, ddp=None, moe_tracker=None, forward_only: bool = False,
                     tracer=None) -> StepOutput:
    """Run this rank's part of one step: forward (and backward) of every micro-batch on every chunk.

    Each micro-batch backpropagates sum(loss * mask) / global_tokens (times the fp16 loss scale), so
    gradients summed over replicas are the token-weighted mean whatever the split of the batch.
    """
    num_chunks, m = len(model_chunks), len(microbatches)
    if m == 0:
        return StepOutput(torch.zeros((), device=ctx.device))
    actions: List[Action] = build_schedule(schedule, ctx.pp, m, num_chunks)[ctx.pp_rank]
    if forward_only:
        actions = [a for a in actions if a.op in ("recv_fwd", "fwd", "send_fwd")]
    loss_sum = torch.zeros((), dtype=torch.float32, device=ctx.device)
    tokens = [float(mb["loss_mask"].sum()) for mb in microbatches]
    aux_scales = [t / global_tokens * loss_scale for t in tokens]  # each micro-batch's share of the aux losses
    if ddp is not None and not forward_only:
        for c in range(num_chunks):
            ddp.enable_grad_sync(c, m == 1)

    def forward_step(chunk: int, mb: int, input_tensor: Optional[torch.Tensor]) -> torch.Tensor:
        nonlocal loss_sum
        model, batch = model_chunks[chunk], microbatches[mb]
        if moe_tracker is not None:
            moe_tracker.aux_loss_scale = aux_scales[mb]
        with torch.set_grad_enabled(not forward_only):
            out = model(tokens=batch["tokens"].to(ctx.device) if model.pre_process else None,
                        hidden_states=input_tensor,
                        labels=batch["labels"].to(ctx.device) if model.post_process else None)
        if not model.post_process:
            return out  # [s(/tp), b, h] to the next stage
        mask = batch["loss_mask"].to(ctx.device, torch.float32)
        summed = (out * mask).sum()  # [b, s] per-token loss -> scalar
        loss_sum = loss_sum + summed.detach()
        return summed * (loss_scale / global_tokens)

    def backward_step(chunk: int, mb: int, input_tensor, output_tensor, output_grad):
        if ddp is not None and mb == m - 1:
            ddp.enable_grad_sync(chunk, True)  # last micro-batch of this chunk: buckets may reduce now
        if moe_tracker is not None:  # a recomputed forward inside this backward re-reads the scale
            moe_tracker.aux_loss_scale = aux_scales[mb]
        torch.autograd.backward(output_tensor, grad_tensors=output_grad)
        return input_tensor.grad if input_tensor is not None else None

    backend = ctx.backend
    execute_schedule(actions, forward_step=compute_timer(backend, forward_step),
                     backward_step=compute_timer(backend, backward_step),
                     p2p=stage_p2p(ctx, model_chunks), tracer=tracer,
                     deallocate_outputs=not forward_only)
    return StepOutput(loss_sum)


def compute_timer(backend, fn):
    """`fn` that reports its compute time, without time spent in collectives, to `backend.after_compute`
    (where a simulated slow device stretches it; see `wait_clock`)."""
    def run(*args):
        waited, start = wait_clock.total(), time.perf_counter()
        out = fn(*args)
        elapsed = time.perf_counter() - start - (wait_clock.total() - waited)
        backend.after_compute(max(elapsed, 0.0))
        return out
    return run


def stage_p2p(ctx: ParallelContext, model_chunks) -> StageP2P:
    """P2P to the neighbouring stages of this rank's pipeline, re-slicing between TP degrees, per link."""
    sp = any(getattr(m, "sequence_parallel_flag", False) for m in model_chunks)
    dtype = next((p.dtype for m in model_chunks for p in m.parameters() if p.is_floating_point()), None)
    return StageP2P(ctx.links, ctx.stage_ranks, ctx.pp_rank, ctx.tp_rank, sp, dtype)
