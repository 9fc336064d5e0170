"""Gradient reductions that are not data parallelism: sequence-parallel norms and tied embeddings.

They run once per step after the last backward, on whatever holds the accumulated gradient (the
data-parallel buffer's `main_grad` when present, else `.grad`).
"""
from __future__ import annotations

from typing import Iterable

import torch

from megahet.parallel.comm import CommGroup


def grad_of(p: torch.Tensor):
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def _reduce_flat(grads, group: CommGroup):
    """Sum a list of tensors over `group` with one collective (flatten, reduce, copy back)."""
    grads = [g for g in grads if g is not None]
    if not grads or group.size == 1:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    group.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def allreduce_sequence_parallel_grads(params: Iterable[torch.Tensor], tp_group: CommGroup) -> None:
    """Norm weights (and other replicated params) saw only this rank's sequence shard: sum over TP."""
    _reduce_flat([grad_of(p) for p in params if getattr(p, "sequence_parallel", False)], tp_group)


def allreduce_embedding_grads(params: Iterable[torch.Tensor], embedding_group: CommGroup) -> None:
    """The tied word embedding lives on the first and the last stage: sum both copies' grads."""
    _reduce_flat([grad_of(p) for p in params if getattr(p, "shared_embedding", False)], embedding_group)
