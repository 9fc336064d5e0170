"""Router auxiliary losses and the autograd trick that applies them without touching the LM loss.

`attach_aux_loss(x, aux, scale)` is identity on `x` in forward; in backward it also backpropagates
`aux * scale` (Megatron's MoEAuxLossAutoScaler). The aux loss thus reaches the router from inside
the layer, so pipeline stages and schedules need no extra loss plumbing. `scale` is the micro-batch's
share of the global batch's loss tokens, captured in forward, so aux losses are token-weighted like
the LM loss even when 1F1B runs other micro-batches' forwards before this backward.
"""
from __future__ import annotations

import torch


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def load_balancing_loss(aux_scores: torch.Tensor, tokens_per_expert: torch.Tensor, num_tokens: int,
                        topk: int) -> torch.Tensor:
    """Switch / Megatron load-balancing loss E * sum_e f_e * P_e, without its coefficient.

    f_e = tokens_per_expert[e] / (num_tokens * topk) (share of top-k assignments), P_e = mean router
    probability of expert e over the `num_tokens` tokens. `aux_scores` [n, E] may be a shard of those
    tokens (sequence parallelism): then the result is this shard's part and the shards' parts sum to
    the loss. 1.0 means perfectly balanced.
    """
    num_experts = aux_scores.shape[-1]
    prob_sum = _at_least_fp32(aux_scores).sum(dim=0)  # [E]
    f = tokens_per_expert.to(prob_sum) / (num_tokens * topk)  # [E]
    return num_experts * torch.sum(f * prob_sum) / num_tokens


def z_loss(logits: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Router z-loss mean(logsumexp(logits)^2) over `num_tokens` tokens, without its coefficient.

    `logits` [n, E] may be a shard of the tokens, as for `load_balancing_loss`.
    """
    return torch.logsumexp(_at_least_fp32(logits), dim=-1).square().sum() / num_tokens


class AuxLossAutoScaler(torch.autograd.Function):
    """Forward: identity on x. Backward: x's grad unchanged, plus d(aux)/d(aux) = scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


def attach_aux_loss(x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    """Return x (identity) such that backward through it also backpropagates `aux * scale`."""
    if not aux.requires_grad:
        return x
    return AuxLossAutoScaler.apply(x, aux, float(scale))
