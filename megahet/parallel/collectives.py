"""Autograd-aware collectives for tensor, sequence and expert parallelism (Megatron semantics).

Each function names its forward and backward communication; the pairs are adjoint, which is why
gradients stay exact. All of them take an explicit CommGroup.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megahet.parallel.comm import CommGroup


def _split(x: torch.Tensor, group: CommGroup, dim: int) -> torch.Tensor:
    if group.size == 1:
        return x
    if x.shape[dim] % group.size:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} across {group.size} ranks")
    return x.chunk(group.size, dim=dim)[group.rank].contiguous()


class _CopyToRegion(torch.autograd.Function):
    """Forward identity, backward all-reduce: the input feeds every TP rank's partial computation."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_reduce(grad.contiguous().clone()), None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward all-reduce (sum partial outputs), backward identity."""

    @staticmethod
    def forward(ctx, x, group):
        return group.all_reduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Split(torch.autograd.Function):
    """Forward keep this rank's slice of `dim` (last: TP region, 0: sequence), backward all-gather it."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_gather(grad.contiguous(), dim=ctx.dim), None, None


class _GatherFromRegion(torch.autograd.Function):
    """Forward all-gather the last dim, backward keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.all_gather(x.contiguous(), dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, -1), None


class _GatherFromSequence(torch.autograd.Function):
    """Forward all-gather the sequence (dim 0); backward reduce-scatter, since every rank's TP
    computation used the full sequence and produced a partial gradient for all of it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.all_gather(x.contiguous(), dim=0)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.reduce_scatter(grad.contiguous(), dim=0), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Forward reduce-scatter partial outputs into sequence shards, backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.reduce_scatter(x.contiguous(), dim=0)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_gather(grad.contiguous(), dim=0), None


class _AllToAll(torch.autograd.Function):
    """Exchange rows between members; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, group, in_splits, out_splits):
        ctx.group, ctx.in_splits, ctx.out_splits = group, list(in_splits), list(out_splits)
        return group.all_to_all(x, in_splits, out_splits)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_to_all(grad.contiguous(), ctx.out_splits, ctx.in_splits), None, None, None


def copy_to_tensor_parallel_region(x, group: CommGroup):
    return x if group.size == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x, group: CommGroup):
    return x if group.size == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x, group: CommGroup):
    return x if group.size == 1 else _Split.apply(x, group, -1)


def gather_from_tensor_parallel_region(x, group: CommGroup):
    return x if group.size == 1 else _GatherFromRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x, group: CommGroup):
    return x if group.size == 1 else _Split.apply(x, group, 0)


def gather_from_sequence_parallel_region(x, group: CommGroup):
    return x if group.size == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x, group: CommGroup):
    return x if group.size == 1 else _ReduceScatterToSequence.apply(x, group)


def all_to_all(x, group: CommGroup, in_splits: Sequence[int], out_splits: Sequence[int]):
    return x if group.size == 1 else _AllToAll.apply(x, group, in_splits, out_splits)
