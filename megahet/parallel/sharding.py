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
