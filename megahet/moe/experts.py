"""The routed experts of one MoE layer as stacked weights, run with one grouped matmul per linear.

Full logical weights are `linear_fc1.weight` [E, h, chunks*ffn] (SwiGLU: [gate; up] blocks) and
`linear_fc2.weight` [E, ffn, h], generated from (seed, name) and then sliced twice: experts along dim
0 across the expert-parallel group (this rank keeps E/ep consecutive experts) and the ffn dim across
the tensor-parallel group (expert tensor parallelism, split block-wise like the dense SwiGLU MLP).
Experts have no biases (as Megatron's grouped GEMM and Mixtral).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from megahet.config import ModelConfig
from megahet.errors import MegahetError
from megahet.models.transformer import ffn_activation, init_stds
from megahet.parallel.context import ParallelContext
from megahet.parallel.init import init_full_normal
from megahet.parallel.sharding import shard_tensor
from megahet.parallel.tensor_parallel import tp_parameter


def _expert_param(full: torch.Tensor, ctx: ParallelContext, tp_dim: int, chunks: int, dtype, device) -> nn.Parameter:
    local = shard_tensor(full, 0, ctx.ep_group.rank, ctx.ep_group.size)  # [E/ep, ...]
    p = tp_parameter(local, ctx.tp_group, tp_dim, chunks, dtype, device)
    # Expert grads are reduced over the expert-data-parallel group only, and checkpoints gather
    # them over EP along ep_dim (then over TP along tp_dim).
    p.is_expert, p.ep_dim = True, 0
    return p


class _Linear(nn.Module):
    """Holds one stacked weight, so names read `experts.linear_fc1.weight` as in Megatron."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight


class GroupedExperts(nn.Module):
    """This rank's E/ep experts (each with its ffn/tp slice). forward: rows sorted by local expert."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, prefix: str, seed: int, dtype, device):
        super().__init__()
        e, h, ffn = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size
        if e % ctx.ep_group.size:
            raise MegahetError(f"--num-experts {e} is not divisible by --expert-model-parallel-size "
                               f"{ctx.ep_group.size}; use an expert-parallel size that divides the expert count")
        if ffn % ctx.tp_group.size:
            raise MegahetError(f"--moe-ffn-hidden-size {ffn} is not divisible by --tensor-model-parallel-size "
                               f"{ctx.tp_group.size}; pick a multiple of the tensor-parallel size")
        self.kernels, self.swiglu = ctx.kernels, cfg.swiglu
        chunks = 2 if cfg.swiglu else 1
        std, out_std = init_stds(cfg)
        fc1 = init_full_normal((e, h, chunks * ffn), std, seed, f"{prefix}.linear_fc1.weight")
        fc2 = init_full_normal((e, ffn, h), out_std, seed, f"{prefix}.linear_fc2.weight")
        self.linear_fc1 = _Linear(_expert_param(fc1, ctx, 2, chunks, dtype, device))  # [E/ep, h, chunks*ffn/tp]
        self.linear_fc2 = _Linear(_expert_param(fc2, ctx, 1, 1, dtype, device))  # [E/ep, ffn/tp, h]

    def forward(self, x: torch.Tensor, tokens_per_expert: Sequence[int]) -> torch.Tensor:
        """x [T, h] sorted by local expert, tokens_per_expert E/ep ints -> [T, h], partial over TP."""
        x = x.to(self.linear_fc1.weight.dtype)
        h = self.kernels.grouped_matmul(x, self.linear_fc1.weight, tokens_per_expert)  # [T, chunks*ffn/tp]
        h = ffn_activation(h, self.swiglu, self.kernels)  # [T, ffn/tp]
        return self.kernels.grouped_matmul(h, self.linear_fc2.weight, tokens_per_expert)  # [T, h]
