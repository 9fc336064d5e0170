"""Slicing full (unsharded) tensors into tensor-parallel shards and back.

A sharded parameter carries `tp_dim` (the dim split across tensor parallel; None when replicated)
and `tp_chunks`: the full tensor is `tp_chunks` blocks stacked along `tp_dim` (e.g. the fused
[gate; up] weight of SwiGLU is 2 blocks) and each block is split across ranks, so rank r holds
block_0[r] ++ block_1[r] ++ ... . Initialisation and checkpoints use these two functions only, which is
what keeps weights identical under every layout.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def shard_tensor(full: torch.Tensor, dim: Optional[int], rank: int, size: int, chunks: int = 1) -> torch.Tensor:
    """This rank's shard of `full` (a view-free copy when sharded, `full` itself when replicated)."""
    if dim is None or size == 1:
        return full
    blocks = full.chunk(chunks, dim=dim)
    pieces = []
    for block in blocks:
        if block.shape[dim] % size:
            raise ValueError(f"cannot split dim {dim} of size {block.shape[dim]} into {size} shards")
        pieces.append(block.chunk(size, dim=dim)[rank])
    return torch.cat(pieces, dim=dim).contiguous()


def unshard_tensor(shards: Sequence[torch.Tensor], dim: Optional[int], chunks: int = 1) -> torch.Tensor:
    """Inverse of `shard_tensor`: the full tensor from every rank's shard, in rank order."""
    if dim is None or len(shards) == 1:
        return shards[0]
    per_rank = [s.chunk(chunks, dim=dim) for s in shards]
    blocks = [torch.cat([p[c] for p in per_rank], dim=dim) for c in range(chunks)]
    return torch.cat(blocks, dim=dim)


def set_tp_attributes(param: torch.Tensor, dim: Optional[int], chunks: int = 1) -> torch.Tensor:
    param.tp_dim = dim
    param.tp_chunks = chunks
    return param


def gather_full(tensor: torch.Tensor, like: torch.Tensor, group) -> torch.Tensor:
    """All-gather the TP shards of `tensor` (a parameter or its grad, sharded as `like`) into the full tensor."""
    dim = getattr(like, "tp_dim", None)
    if dim is None or group.size == 1:
        return tensor
    stacked = group.all_gather(tensor.detach().contiguous().unsqueeze(0), dim=0)  # [tp, *shard]
    return unshard_tensor(list(stacked.unbind(0)), dim, getattr(like, "tp_chunks", 1))


def _ep_dim(param: torch.Tensor) -> Optional[int]:
    """Dim split across expert parallelism (expert params only; None otherwise)."""
    return getattr(param, "ep_dim", None) if getattr(param, "is_expert", False) else None


def full_shape(param: torch.Tensor, tp_size: int, ep_size: int = 1) -> tuple:
    """Shape of the unsharded tensor behind a (possibly TP- and EP-sharded) parameter."""
    shape = list(param.shape)
    dim = getattr(param, "tp_dim", None)
    if dim is not None:
        shape[dim] *= tp_size
    edim = _ep_dim(param)
    if edim is not None:
        shape[edim] *= ep_size
    return tuple(shape)


def gather_param_full(tensor: torch.Tensor, like: torch.Tensor, ctx) -> torch.Tensor:
    """Full tensor of a parameter-shaped `tensor` (weights, grads or optimizer state): over TP, then EP."""
    out = gather_full(tensor, like, ctx.tp_group)
    edim = _ep_dim(like)
    if edim is not None and ctx.ep_group.size > 1:
        out = ctx.ep_group.all_gather(out.detach(), dim=edim)
    return out


def shard_param_full(full: torch.Tensor, like: torch.Tensor, ctx) -> torch.Tensor:
    """Inverse of `gather_param_full`: this rank's slice of a full tensor, for parameter `like`."""
    full = shard_tensor(full, _ep_dim(like), ctx.ep_group.rank, ctx.ep_group.size)
    return shard_tensor(full, getattr(like, "tp_dim", None), ctx.tp_group.rank, ctx.tp_group.size,
                        getattr(like, "tp_chunks", 1))
