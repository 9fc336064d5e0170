"""Top-k router: which experts each token goes to, and with what weight.

The routing math is a set of pure functions (testable against a per-token loop) plus one module that
owns the router weight and the aux-loss-free expert bias. Conventions follow Megatron-Core, and the
Mixtral configuration (softmax, no pre-softmax, top-k, renormalise) is computed exactly as Hugging
Face's Mixtral does (softmax over all experts in fp32, top-k, divide by the top-k sum) so exported
models route identically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megahet.config import ModelConfig
from megahet.errors import MegahetError
from megahet.parallel.init import init_full_normal


def routing_scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Per-expert scores in fp32: softmax over experts or element-wise sigmoid. [N, E] -> [N, E]."""
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1, dtype=torch.float32)
    if score_function == "sigmoid":
        return torch.sigmoid(logits.float())
    raise MegahetError(f"--moe-router-score-function must be softmax or sigmoid, got {score_function!r}")


def scores_for_aux_loss(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Probabilities the load-balancing loss sees: softmax, or sigmoid normalised per token. [N, E]."""
    scores = routing_scores(logits, score_function)
    if score_function == "sigmoid":
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    return scores


def group_limited_topk(scores: torch.Tensor, topk: int, num_groups: int, group_topk: int) -> torch.Tensor:
    """DeepSeek-V3 node-limited routing: top-k experts from the `group_topk` best expert groups.

    A group's score is the sum of its best `topk // group_topk` scores. Returns indices [N, topk].
    """
    n, e = scores.shape
    per_group = max(1, topk // group_topk)
    if per_group > e // num_groups or topk > group_topk * (e // num_groups):
        raise MegahetError(f"group-limited routing needs topk // group_topk ({topk} // {group_topk}) <= experts per "
                           f"group ({e // num_groups}) and topk <= group_topk * experts per group; fix "
                           f"--moe-router-topk/--moe-router-group-topk/--moe-router-num-groups")
    grouped = scores.view(n, num_groups, e // num_groups)  # [N, G, E/G]
    group_scores = grouped.topk(per_group, dim=-1).values.sum(dim=-1)  # [N, G]
    group_idx = group_scores.topk(group_topk, dim=-1).indices  # [N, group_topk]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)  # [N, G]
    expert_mask = group_mask.unsqueeze(-1).expand(n, num_groups, e // num_groups).reshape(n, e)  # [N, E]
    return scores.masked_fill(~expert_mask, float("-inf")).topk(topk, dim=-1).indices  # [N, topk]


def route(logits: torch.Tensor, topk: int, score_function: str = "softmax", pre_softmax: bool = False,
          num_groups: Optional[int] = None, group_topk: Optional[int] = None,
          scaling_factor: Optional[float] = None, expert_bias: Optional[torch.Tensor] = None):
    """Pick `topk` experts per token and their combination weights.

    Selection uses scores (+ `expert_bias`, aux-loss-free balancing: it steers selection only and
    never enters the weights). Weights: the chosen scores renormalised over the top-k (softmax: Mixtral /
    Megatron's top-k-then-softmax; sigmoid: when topk > 1), or, with `pre_softmax` ("pre-softmax /
    pre-sigmoid" routing in Megatron's help), the chosen softmax or sigmoid scores as they are (HF's
    norm_topk_prob=False). Then times `scaling_factor`.

    Args:
        logits: [N, E] router logits.
    Returns:
        weights [N, topk] fp32 and indices [N, topk] int64.
    """
    scores = routing_scores(logits, score_function)  # [N, E] fp32
    select = scores if expert_bias is None else scores + expert_bias.float()  # [N, E]
    if num_groups and group_topk:
        indices = group_limited_topk(select, topk, num_groups, group_topk)  # [N, k]
    else:
        indices = select.topk(topk, dim=-1).indices  # [N, k]
    weights = scores.gather(1, indices)  # [N, k]
    renormalise = not pre_softmax and (score_function == "softmax" or topk > 1)
    if renormalise:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if score_function == "sigmoid" else 0.0))
    if scaling_factor:
        weights = weights * scaling_factor
    return weights, indices


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(tokens * topk / experts * factor)."""
    return int(math.ceil(num_tokens * topk / num_experts * capacity_factor))


def capacity_keep_mask(weights: torch.Tensor, indices: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments survive the capacity: per expert, the `capacity` highest-weight ones.

    weights, indices: [N, k]. Returns a bool mask [N, k]; ties keep the earlier token.
    """
    flat_w = weights.detach().reshape(-1)  # [N*k]
    flat_e = indices.reshape(-1)  # [N*k]
    by_weight = torch.sort(flat_w, descending=True, stable=True).indices  # [N*k]
    order = by_weight[torch.sort(flat_e[by_weight], stable=True).indices]  # grouped by expert, best first
    counts = torch.bincount(flat_e, minlength=num_experts)  # [E]
    starts = torch.cumsum(counts, 0) - counts  # [E]
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]  # [N*k]
    keep = torch.zeros_like(flat_e, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity
    return keep.view_as(indices)


@torch.no_grad()
def updated_expert_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower the over-loaded."""
    load = load.float()
    return bias + rate * torch.sign(load.mean() - load)


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [N, E] fp32
    weights: torch.Tensor  # [N, k] fp32
    indices: torch.Tensor  # [N, k] int64


class TopKRouter(nn.Module):
    """Router weight [E, h] (fp32, replicated) and the optional expert-bias buffer.

    The bias is a buffer, not a parameter: `update_bias` moves it from the routed load after each
    optimizer step. `local_tokens_per_expert` accumulates that load between updates (training
    forwards only).
    """

    def __init__(self, cfg: ModelConfig, prefix: str, seed: int, sequence_parallel: bool, device):
        super().__init__()
        self.cfg = cfg
        full = init_full_normal((cfg.num_experts, cfg.hidden_size), cfg.init_method_std, seed, f"{prefix}.weight")
        self.weight = nn.Parameter(full.to(device=device))
        # Under sequence parallelism each TP rank routes its own sequence shard: its grad is partial.
        self.weight.sequence_parallel = sequence_parallel
        if cfg.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, device=device))
            self.register_buffer("local_tokens_per_expert", torch.zeros(cfg.num_experts, device=device),
                                 persistent=False)
        else:
            self.expert_bias = None
            self.local_tokens_per_expert = None

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x [N, h] (any dtype) -> logits, top-k weights and indices."""
        c = self.cfg
        logits = F.linear(x.float(), self.weight)  # [N, E] fp32
        weights, indices = route(logits, c.moe_router_topk, c.moe_router_score_function, c.moe_router_pre_softmax,
                                 c.moe_router_num_groups, c.moe_router_group_topk,
                                 c.moe_router_topk_scaling_factor, self.expert_bias)
        return RouterOutput(logits, weights, indices)

    @torch.no_grad()
    def accumulate_load(self, tokens_per_expert: torch.Tensor) -> None:
        if self.local_tokens_per_expert is not None:
            self.local_tokens_per_expert += tokens_per_expert.to(self.local_tokens_per_expert)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Apply one bias step from `load` (the same on every replica) and clear the accumulator."""
        if self.expert_bias is None:
            return
        self.expert_bias.copy_(updated_expert_bias(self.expert_bias, load.to(self.expert_bias.device),
                                                   self.cfg.moe_router_bias_update_rate))
        self.local_tokens_per_expert.zero_()
