"""Gradient buffers (data parallel) and the optimizer for this rank's model chunks."""
from __future__ import annotations

from megahet.config import MegahetConfig
from megahet.parallel.context import ParallelContext
from megahet.parallel.data_parallel import DataParallel
from megahet.training.distributed_optimizer import DistributedOptimizer
from megahet.training.model_builder import params_dtype
from megahet.training.optimizer import MixedPrecisionOptimizer


def build_optimizer(cfg: MegahetConfig, ctx: ParallelContext, model_chunks, loss_scaler):
    """Returns (ddp, optimizer): fp32 gradient buffers with bucketed reduction, and AdamW with fp32
    master weights (sharded over data parallel with --use-distributed-optimizer)."""
    p, t = cfg.parallel, cfg.train
    ddp = DataParallel(model_chunks, ctx, bucket_size=p.ddp_bucket_size, overlap_grad_reduce=p.overlap_grad_reduce,
                       use_distributed_optimizer=p.use_distributed_optimizer,
                       gradient_accumulation_fusion=t.gradient_accumulation_fusion)
    cls = DistributedOptimizer if p.use_distributed_optimizer else MixedPrecisionOptimizer
    optimizer = cls(model_chunks, ddp, ctx, lr=t.lr, weight_decay=t.weight_decay, betas=(t.adam_beta1, t.adam_beta2),
                    eps=t.adam_eps, clip_grad=t.clip_grad, params_dtype=params_dtype(cfg, ctx.backend),
                    loss_scaler=loss_scaler, implementation=t.optimizer_implementation)
    return ddp, optimizer
