"""Tensor-parallel layers (Megatron): column/row-parallel linear, vocab-parallel embedding and loss.

Weights are generated full-size from (seed, global name) and sliced (`init.py`, `sharding.py`), so
the same seed gives the same model under every tensor-parallel degree.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megahet.parallel import collectives as C
from megahet.parallel import grad_accumulation as GA
from megahet.parallel.comm import CommGroup
from megahet.parallel.init import init_full_normal
from megahet.parallel.sharding import set_tp_attributes, shard_tensor


def tp_parameter(full: torch.Tensor, group: CommGroup, dim: Optional[int], chunks: int, dtype, device) -> nn.Parameter:
    """This rank's TP shard of `full` as a parameter carrying `tp_dim`/`tp_chunks` (see sharding.py)."""
    shard = shard_tensor(full, dim, group.rank, group.size, chunks)
    p = nn.Parameter(shard.to(device=device, dtype=dtype))
    return set_tp_attributes(p, dim, chunks)


def padded_vocab_weight(vocab_size: int, padded_vocab_size: int, hidden_size: int, init_std: float, seed: int,
                        name: str) -> torch.Tensor:
    """Full [padded_vocab, h] weight: real rows from (seed, name), padding rows zero (the loss masks them)."""
    full = torch.zeros(padded_vocab_size, hidden_size)
    full[:vocab_size] = init_full_normal((vocab_size, hidden_size), init_std, seed, name)
    return full


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows across the TP group.

    Args:
        input_size, output_size: full (unsharded) sizes.
        name: global name prefix of the weight (e.g. "decoder.layers.3.mlp.linear_fc1").
        chunks: number of stacked blocks in the output dim that are split separately (2 for [gate; up]).
        gather_output: all-gather the output columns (otherwise each rank keeps its slice).
        sequence_parallel: the input is a sequence shard [s/tp, b, h] to be all-gathered first.
        create_weight: False for a tied output layer, whose weight (the embedding's) is passed to forward.
    """

    def __init__(self, input_size: int, output_size: int, *, group: CommGroup, name: str, seed: int,
                 init_std: float, bias: bool = False, gather_output: bool = False, sequence_parallel: bool = False,
                 chunks: int = 1, dtype=torch.float32, device=None, create_weight: bool = True):
        super().__init__()
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        if output_size % (group.size * chunks):
            raise ValueError(f"{name}: output size {output_size} not divisible by tp {group.size} x chunks {chunks}")
        self.output_size_per_partition = output_size // group.size
        self.weight = None
        if create_weight:
            full = init_full_normal((output_size, input_size), init_std, seed, f"{name}.weight")
            self.weight = tp_parameter(full, group, 0, chunks, dtype, device)
        self.bias = tp_parameter(torch.zeros(output_size), group, 0, chunks, dtype, device) if bias else None

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = weight if weight is not None else self.weight
        if self.sequence_parallel:
            x = C.gather_from_sequence_parallel_region(x, self.group)  # [s/tp,b,h] -> [s,b,h]
        else:
            x = C.copy_to_tensor_parallel_region(x, self.group)  # backward sums the TP ranks' input grads
        # The weight gradient goes straight into main_grad (gradient-accumulation fusion); a weight
        # passed in belongs to another layer (tied embedding), whose backward fires its hook.
        y = GA.linear(x, w, self.bias, owner=weight is None)  # [s, b, out/tp]
        if self.gather_output:
            y = C.gather_from_tensor_parallel_region(y, self.group)  # [s, b, out]
        return y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; partial outputs are summed across TP.

    With sequence parallelism the sum is a reduce-scatter into sequence shards [s/tp, b, h].
    """

    def __init__(self, input_size: int, output_size: int, *, group: CommGroup, name: str, seed: int,
                 init_std: float, bias: bool = False, sequence_parallel: bool = False,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        if input_size % group.size:
            raise ValueError(f"{name}: input size {input_size} not divisible by tp {group.size}")
        full = init_full_normal((output_size, input_size), init_std, seed, f"{name}.weight")
        self.weight = tp_parameter(full, group, 1, 1, dtype, device)
        self.bias = None
        if bias:
            self.bias = tp_parameter(torch.zeros(output_size), group, None, 1, dtype, device)
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = GA.linear(x, self.weight)  # [s, b, h] partial sum over this rank's input slice
        if self.sequence_parallel:
            y = C.reduce_scatter_to_sequence_parallel_region(y, self.group)  # [s/tp, b, h]
        else:
            y = C.reduce_from_tensor_parallel_region(y, self.group)  # [s, b, h]
        if self.bias is not None:
            y = y + self.bias
        return y


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split across TP; output [s, b, h].

    Rows past the real vocabulary are padding: zero-initialised and never looked up.
    """

    def __init__(self, vocab_size: int, padded_vocab_size: int, hidden_size: int, *, group: CommGroup, name: str,
                 seed: int, init_std: float, sequence_parallel: bool = False, dtype=torch.float32, device=None):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.vocab_size, self.padded_vocab_size = vocab_size, padded_vocab_size
        if padded_vocab_size % group.size:
            raise ValueError(f"padded vocabulary {padded_vocab_size} not divisible by tp {group.size}")
        self.per_partition = padded_vocab_size // group.size
        self.vocab_start = group.rank * self.per_partition
        full = padded_vocab_weight(vocab_size, padded_vocab_size, hidden_size, init_std, seed, f"{name}.weight")
        self.weight = tp_parameter(full, group, 0, 1, dtype, device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.t()  # [b, s] -> [s, b]
        if self.group.size > 1:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_start + self.per_partition)
            local = (ids - self.vocab_start).masked_fill(outside, 0)
            emb = GA.embedding(local, self.weight)  # [s, b, h]
            emb = emb.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            emb = GA.embedding(ids, self.weight)  # [s, b, h]
        # Each rank holds the rows of its vocabulary slice only: summing across TP completes the lookup.
        if self.sequence_parallel:
            return C.reduce_scatter_to_sequence_parallel_region(emb, self.group)  # [s/tp, b, h]
        return C.reduce_from_tensor_parallel_region(emb, self.group)  # [s, b, h]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary, without gathering the logits.

    Padded vocabulary columns are masked out, so the loss does not depend on how much padding a
    layout needed.
    """

    @staticmethod
    def forward(ctx, logits, labels, group: CommGroup, vocab_start: int, vocab_size: int):
        logits = logits.float()  # [s, b, v/tp]
        v_local = logits.shape[-1]
        if vocab_start + v_local > vocab_size:  # this shard holds padding columns: decided without a device sync
            pad = torch.arange(vocab_start, vocab_start + v_local, device=logits.device) >= vocab_size  # [v/tp]
            logits = logits.masked_fill(pad, float("-inf"))
        lmax = logits.max(dim=-1).values
        group.all_reduce(lmax, op="max")  # global max for a stable softmax
        # In place from here on (as Megatron): the logits are not needed by any other backward.
        shifted = logits.sub_(lmax.unsqueeze(-1))
        in_shard = (labels >= vocab_start) & (labels < vocab_start + v_local)
        local_label = (labels - vocab_start).masked_fill(~in_shard, 0)
        target = shifted.gather(-1, local_label.unsqueeze(-1)).squeeze(-1).masked_fill(~in_shard, 0.0)
        group.all_reduce(target)  # exactly one rank holds each label's logit
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        group.all_reduce(sum_exp)
        loss = sum_exp.log() - target  # [s, b]
        # exp / sum_exp is left to the backward, which scales every row anyway: one pass fewer.
        ctx.save_for_backward(exp, sum_exp, local_label, in_shard)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        exp, sum_exp, local_label, in_shard = ctx.saved_tensors
        grad = exp.mul_((grad_loss / sum_exp).unsqueeze(-1))  # softmax * grad, in place: backward runs once
        rows = grad.view(-1, grad.shape[-1])
        idx = torch.arange(rows.shape[0], device=grad.device)
        rows[idx, local_label.reshape(-1)] -= (in_shard.to(grad.dtype) * grad_loss).reshape(-1)
        return grad, None, None, None, None


class _LocalCrossEntropy(torch.autograd.Function):
    """Cross-entropy over the whole (unsharded) vocabulary, from torch's fused log-softmax.

    With one TP rank nothing is exchanged, and the fused kernel finds each row's max and sum of
    exponentials while the row is in cache; the sharded path's separate max, subtract, exp, sum and
    divide each sweep the whole logits tensor. It writes over the logits (each row is reduced before
    it is written; tests/unit/test_cross_entropy.py checks the result), as the sharded path does, so
    no second logits-sized tensor is allocated. Backward turns the saved log-probabilities into the
    gradient in place (exp, minus one at the label, times the incoming gradient).
    """

    @staticmethod
    def forward(ctx, logits, labels, vocab_size: int):
        logits = logits.float()  # [s, b, v]
        if logits.shape[-1] > vocab_size:  # padding columns: never predicted
            logits[..., vocab_size:] = float("-inf")
        logp = torch.log_softmax(logits, dim=-1, out=logits)  # [s, b, v]
        loss = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).neg()  # [s, b]
        ctx.save_for_backward(logp, labels)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logp, labels = ctx.saved_tensors
        grad = logp.exp_()  # softmax, reused in place: backward runs once
        grad.scatter_add_(-1, labels.unsqueeze(-1), torch.full_like(grad_loss, -1.0).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group: CommGroup,
                                 vocab_start: int, vocab_size: int) -> torch.Tensor:
    """Per-token loss [s, b] (fp32) from vocabulary-sharded logits [s, b, v/tp] and labels [s, b]."""
    if group.size == 1:
        return _LocalCrossEntropy.apply(logits, labels, vocab_size)
    return _VocabParallelCrossEntropy.apply(logits, labels, group, vocab_start, vocab_size)
