"""Gradient-accumulation fusion (Megatron): weight gradients written straight into `param.main_grad`.

Without it every micro-batch's weight gradient is a fresh tensor in `param.grad` that a hook then
adds into the fp32 buffer, and the buffer is zeroed before every step. With it the linear layers'
backward computes `grad_output^T @ input` directly into `main_grad`: the first write of a step
overwrites (`torch.mm(..., out=)`), later micro-batches accumulate (`addmm_`), so the buffer is
never zeroed and no gradient tensor is allocated.

Every param of a DataParallel carries a `MainGradState`. The fused backward returns an uninitialised
dummy `.grad` (as Megatron does) only so that autograd still runs the post-accumulate hook, which
tells the buffer that the param is ready (bucket overlap); the hook drops the dummy. A weight that
another layer passed in (the tied output layer at pipeline size 1) is written but returns no dummy:
its owner's own gradient (the embedding's) arrives later and fires the hook.

Only fp32 params fuse (their gradient has the buffer's dtype). bf16/fp16 params keep autograd's
path, whose low-precision sums (a tied weight's two gradients, added in bf16 before the fp32 buffer)
a direct write would change; they still skip the zeroing (first write copies).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class MainGradState:
    """Per-param bookkeeping of one step's writes into main_grad.

    overwrite: nothing was written since `DataParallel.start_grad_accumulation`: the next write
        replaces the buffer's content (which is last step's) instead of adding to it.
    dummy: the backward already wrote into main_grad and handed autograd a placeholder `.grad`.
    fuse: linear layers may write this param's weight gradient directly (--gradient-accumulation-fusion).
    """
    __slots__ = ("overwrite", "dummy", "fuse")

    def __init__(self, fuse: bool):
        self.overwrite, self.dummy, self.fuse = False, False, fuse


def fusable(weight: torch.Tensor) -> bool:
    """Whether `weight`'s gradient may be written into its main_grad by the layer's own backward."""
    if torch.compiler.is_compiling():  # inside a --compile graph: autograd's own path (see megahet/compile.py)
        return False
    state = getattr(weight, "main_grad_state", None)
    return (state is not None and state.fuse and weight.dtype == weight.main_grad.dtype and weight.requires_grad
            and torch.is_grad_enabled())


@torch.no_grad()
def add_to_main_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """main_grad (+)= grad: the first write of a step copies, later ones add (fp32 += any dtype)."""
    state = param.main_grad_state
    if state.overwrite:
        param.main_grad.copy_(grad)
        state.overwrite = False
    else:
        param.main_grad.add_(grad)


@torch.no_grad()
def write_weight_grad(weight: torch.Tensor, grad_output: torch.Tensor, inputs: torch.Tensor) -> None:
    """main_grad (+)= grad_output^T @ inputs; grad_output [T, out], inputs [T, in], main_grad [out, in]."""
    main = weight.main_grad
    state = weight.main_grad_state
    if state.overwrite:
        torch.mm(grad_output.t(), inputs, out=main)  # [out, in]: no zeroing, no temporary
        state.overwrite = False
    else:
        main.addmm_(grad_output.t(), inputs)  # [out, in] += [out, T] @ [T, in]


def _dummy_grad(weight: torch.Tensor, owner: bool) -> Optional[torch.Tensor]:
    """Uninitialised .grad that only makes autograd run the param's hook (never read)."""
    if not owner:
        return None
    weight.main_grad_state.dummy = True
    return torch.empty_like(weight)


class _LinearMainGrad(torch.autograd.Function):
    """y = x W^T + b whose weight gradient goes straight into W.main_grad.

    The weight is kept on ctx, not saved: it is a leaf param, and a saved tensor may come back as a
    detached copy (under activation recompute) without its main_grad.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, owner: bool):
        ctx.save_for_backward(x)
        ctx.weight, ctx.has_bias, ctx.owner = weight, bias is not None, owner
        return F.linear(x, weight, bias)  # [..., out]

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        go = grad_out.reshape(-1, grad_out.shape[-1])  # [T, out]
        grad_x = go.mm(weight).view(*grad_out.shape[:-1], weight.shape[1])  # [..., in]
        write_weight_grad(weight, go, x.reshape(-1, x.shape[-1]))
        grad_b = go.sum(dim=0) if ctx.has_bias else None  # [out]
        return grad_x, _dummy_grad(weight, ctx.owner), grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           owner: bool = True) -> torch.Tensor:
    """F.linear, with the weight gradient fused into main_grad when the weight allows it.

    Args:
        owner: the caller owns `weight` (False for a weight passed in by another layer, e.g. a tied
            output layer: the owner's backward fires the param's hook).
    """
    if not fusable(weight):
        return F.linear(x, weight, bias)
    return _LinearMainGrad.apply(x, weight, bias, owner)


class _EmbeddingMainGrad(torch.autograd.Function):
    """Embedding lookup whose weight gradient is scattered straight into W.main_grad.

    On the step's first write the rows are scattered into the buffer itself (in token order, the
    same bits as torch's dense embedding backward); otherwise torch's backward
    kernel makes the gradient and it is added, exactly what the hook path computes.
    """

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)  # [..., h]

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        go = grad_out.reshape(-1, grad_out.shape[-1])  # [T, h]
        with torch.no_grad():
            if weight.main_grad_state.overwrite:
                weight.main_grad.zero_().index_add_(0, ids.reshape(-1), go)  # [v, h]
                weight.main_grad_state.overwrite = False
            else:  # autograd's own kernel, then the add
                grad = torch.ops.aten.embedding_dense_backward(grad_out, ids, weight.shape[0], -1, False)
                add_to_main_grad(weight, grad)
        return None, _dummy_grad(weight, True)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.embedding, with the weight gradient scattered into main_grad when the weight allows it."""
    if not fusable(weight):
        return F.embedding(ids, weight)
    return _EmbeddingMainGrad.apply(ids, weight)
