"""One optimizer step: this replica's micro-batches through the pipeline, gradient sync, update.

Losses and gradients are weighted by tokens: each micro-batch backpropagates its summed token loss
divided by the token count of the whole global batch (one all-reduce over data parallel before the
first forward), and replicas SUM their gradients. A replica with 3 samples and one with 1 therefore
give exactly the update of 2 + 2.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List

import torch

from megahet.data.sampler import collate, get_global_batch, split_for_replicas
from megahet.parallel.context import ParallelContext
from megahet.parallel.pipeline import forward_backward


@dataclass
class StepResult:
    loss: float  # token-weighted mean LM loss over the global batch
    tokens: int  # loss tokens of the global batch
    ok: bool  # False when the update was skipped (NaN/Inf)
    grad_norm: float
    step_time_s: float
    compute_time_s: float = 0.0  # this rank's forward/backward (straggler detection, --rebalance)


def replica_microbatches(dataset, consumed_samples: int, global_batch_size: int, replica_sizes: List[int],
                         dp_rank: int, micro_batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """This replica's micro-batches of global batch starting at `consumed_samples`.

    The global batch is the same whatever the layout (one global sample order); replica r takes a
    contiguous slice of `replica_sizes[r]` samples and cuts it into micro-batches. Only that slice is
    read: the split is done on sample indices, so no rank reads the other replicas' samples.
    """
    indices = range(consumed_samples, consumed_samples + global_batch_size)
    own = split_for_replicas(indices, replica_sizes)[dp_rank]
    mine = get_global_batch(dataset, own.start, len(own), wrap=True)
    return [collate(mine[i:i + micro_batch_size]) for i in range(0, len(mine), micro_batch_size)]


def global_token_count(microbatches, ctx: ParallelContext) -> float:
    """Loss tokens of the whole global batch (sum over data-parallel replicas)."""
    # On the compute device: nccl/hccl groups take no host tensors (one host->device copy per step).
    # int64: exact on every library (hccl has no fp64 reductions).
    local = torch.tensor([sum(int(mb["loss_mask"].sum()) for mb in microbatches)], dtype=torch.int64,
                         device=ctx.device)
    ctx.dp_group.all_reduce(local)
    return float(local.item())


def reduce_loss_for_logging(loss_sum: torch.Tensor, ctx: ParallelContext) -> float:
    """Sum the last stage's loss over replicas, through the one world group (every rank takes part)."""
    contributes = ctx.is_last_stage and ctx.tp_rank == 0
    vec = torch.zeros(1, dtype=torch.float64, device=ctx.device)
    if contributes:
        vec[0] = loss_sum.detach().double()  # stays on the device: no host sync here
    ctx.world_group.all_reduce(vec)
    return float(vec[0])


def train_step(model_chunks, ddp, optimizer, ctx: ParallelContext, microbatches, *, schedule: str,
               loss_scaler=None, moe_tracker=None, tracer=None, timers=None) -> StepResult:
    """Forward/backward over `microbatches` (this replica's), gradient sync and optimizer step.

    `timers` (megahet.training.timers.Timers, optional) times "grad-sync" here and the optimizer's
    phases ("norm-clip", "optimizer"); forward/backward are timed per action through `tracer`.
    """
    start = time.perf_counter()
    global_tokens = global_token_count(microbatches, ctx)
    ddp.start_grad_accumulation()  # first writes overwrite: no pass zeroing the buffers
    if moe_tracker is not None:
        moe_tracker.reset()
    scale = loss_scaler.scale if loss_scaler is not None else 1.0
    compute_start = time.perf_counter()
    out = forward_backward(model_chunks, microbatches, ctx, global_tokens=global_tokens, schedule=schedule,
                           loss_scale=scale, ddp=ddp, moe_tracker=moe_tracker, tracer=tracer)
    ctx.backend.synchronize()  # the device's compute is done: its time, not the host's launch time
    compute_s = time.perf_counter() - compute_start
    if timers is not None:
        timers("grad-sync").start()
    ddp.finish_grad_sync()
    if timers is not None:
        timers("grad-sync").stop()
    result = optimizer.step(timers)
    if result.ok and moe_tracker is not None:
        moe_tracker.update_expert_bias(ctx)
    loss = reduce_loss_for_logging(out.loss_sum, ctx) / max(global_tokens, 1.0)
    ctx.backend.synchronize()
    return StepResult(loss=loss, tokens=int(global_tokens), ok=bool(result.ok) and math.isfinite(loss),
                      grad_norm=float(result.grad_norm), step_time_s=time.perf_counter() - start,
                      compute_time_s=compute_s)


def evaluate(model_chunks, ctx: ParallelContext, dataset, *, eval_iters: int, global_batch_size: int,
             replica_sizes: List[int], micro_batch_size: int) -> float:
    """Token-weighted mean loss over `eval_iters` global batches of `dataset` (from its start)."""
    for m in model_chunks:
        m.eval()
    total, tokens = 0.0, 0.0
    try:
        for i in range(eval_iters):
            mbs = replica_microbatches(dataset, i * global_batch_size, global_batch_size, replica_sizes,
                                       ctx.dp_rank, micro_batch_size)
            n = global_token_count(mbs, ctx)
            out = forward_backward(model_chunks, mbs, ctx, global_tokens=n, schedule="afab", forward_only=True)
            total += reduce_loss_for_logging(out.loss_sum, ctx)
            tokens += n
    finally:
        for m in model_chunks:
            m.train()
    return total / max(tokens, 1.0)
