"""MoELayer: router, token dispatcher, grouped experts and optional shared expert in place of the MLP.

Token flow for hidden [s(/tp), b, h]:
  1. route this rank's tokens (with sequence parallelism: its sequence shard);
  2. enter the tensor-parallel region: all-gather the shards over TP (sequence parallel) or, without
     it, note that every TP rank already holds the same tokens — either way each TP rank then runs
     all the tokens through its ffn slice of the experts (expert tensor parallelism = TP);
  3. dispatch over the expert-parallel group, grouped matmuls on the local experts, combine with the
     routing weights;
  4. leave the TP region: reduce-scatter (sequence parallel) or all-reduce the partial outputs;
  5. add the shared expert.
Capacity (token dropping) is applied after step 2, on the same token set under every TP layout.
"""
from __future__ import annotations

import torch
from torch import nn

from megahet.config import ModelConfig
from megahet.errors import MegahetError
from megahet.models.transformer import MLP
from megahet.moe.aux_loss import attach_aux_loss, load_balancing_loss, z_loss
from megahet.moe.dispatcher import Stopwatch, build_dispatcher
from megahet.moe.experts import GroupedExperts
from megahet.moe.router import TopKRouter, capacity_keep_mask, expert_capacity, scores_for_aux_loss
from megahet.parallel import collectives as C
from megahet.parallel.context import ParallelContext


def _in_backward() -> bool:
    """True while autograd runs a backward: a forward seen then is activation recomputation."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class MoELayer(nn.Module):
    """Mixture-of-experts feed-forward block; forward maps [s(/tp), b, h] -> [s(/tp), b, h].

    Args:
        cfg: model config (num_experts, moe_* fields).
        ctx: parallel context (tp_group, ep_group, kernels).
        prefix: global name of the block, e.g. "decoder.layers.3.mlp".
        layer_number: global layer index (the tracker's key).
        seed: weights come from (seed, name), identical under every layout.
        sequence_parallel: the input is a sequence shard [s/tp, b, h].
        tracker: receives router statistics and supplies aux_loss_scale; None: scale 1, no stats.
    Set `profile = True` to time dispatch/combine (seconds in `stopwatch.seconds`).
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, prefix: str, layer_number: int, seed: int,
                 sequence_parallel: bool, dtype, device, tracker=None):
        super().__init__()
        if not cfg.num_experts:
            raise MegahetError("MoELayer needs --num-experts >= 1; leave it unset for a dense model")
        if cfg.moe_expert_capacity_factor is not None and cfg.moe_expert_capacity_factor <= 0:
            raise MegahetError(f"--moe-expert-capacity-factor must be > 0, got {cfg.moe_expert_capacity_factor}; "
                               f"leave it unset for dropless routing")
        self.cfg, self.layer_number, self.tracker = cfg, layer_number, tracker
        self.tp = ctx.tp_group
        self.sequence_parallel = sequence_parallel and self.tp.size > 1
        self.router = TopKRouter(cfg, f"{prefix}.router", seed, self.sequence_parallel, device)
        self.experts = GroupedExperts(cfg, ctx, f"{prefix}.experts", seed, dtype, device)
        self.shared_experts = None
        shared = cfg.moe_shared_expert_intermediate_size
        if shared:
            if shared % self.tp.size:
                raise MegahetError(f"--moe-shared-expert-intermediate-size {shared} is not divisible by "
                                   f"--tensor-model-parallel-size {self.tp.size}; use a multiple of it")
            self.shared_experts = MLP(cfg, ctx, f"{prefix}.shared_experts", seed, self.sequence_parallel, dtype,
                                      device, ffn_hidden_size=shared)
        self.stopwatch = Stopwatch(lambda: ctx.backend.synchronize(ctx.device))
        self.dispatcher = build_dispatcher(cfg.moe_token_dispatcher_type, ctx.ep_group, cfg.num_experts,
                                           self.stopwatch)
        if tracker is not None:
            tracker.register(layer_number, self)

    @property
    def profile(self) -> bool:
        return self.stopwatch.enabled

    @profile.setter
    def profile(self, on: bool) -> None:
        self.stopwatch.enabled = bool(on)

    def _router_losses(self, out, tokens_per_expert: torch.Tensor, num_tokens: int):
        """Aux and z losses (without coefficients) of this rank's routed tokens; partial under SP."""
        c = self.cfg
        need_grad = torch.is_grad_enabled() and (c.moe_aux_loss_coeff > 0 or c.moe_z_loss_coeff > 0)
        with torch.set_grad_enabled(need_grad):
            aux = load_balancing_loss(scores_for_aux_loss(out.logits, c.moe_router_score_function),
                                      tokens_per_expert, num_tokens, c.moe_router_topk)
            z = z_loss(out.logits, num_tokens)
        return aux, z

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        _, b, h = hidden.shape  # [s(/tp), b, h]
        x = hidden.reshape(-1, h)  # [n, h], n = s(/tp) * b
        out = self.router(x)  # logits [n, E], weights/indices [n, k]
        weights, indices = out.weights, out.indices

        # Enter the TP region. With SP every TP rank needs every shard's tokens (its ffn slice must
        # see them all): gather tokens, weights and indices; the gathers' backward reduce-scatters the
        # TP ranks' partial grads. Without SP the tokens are already identical on all TP ranks; the
        # copy's backward all-reduces the partial grads so router and input grads are complete.
        if self.sequence_parallel:
            x_all = C.gather_from_sequence_parallel_region(x, self.tp)  # [N, h], N = s * b
            indices_all = self.tp.all_gather(indices, dim=0)  # [N, k]
        else:
            x_all = C.copy_to_tensor_parallel_region(x, self.tp)  # [N, h]
            indices_all = indices
        num_tokens = indices_all.shape[0]
        tokens_per_expert = torch.bincount(indices_all.reshape(-1), minlength=c.num_experts)  # [E], before drops

        aux, z = self._router_losses(out, tokens_per_expert, num_tokens)
        scale = self.tracker.aux_loss_scale if self.tracker is not None else 1.0
        weights = attach_aux_loss(weights, c.moe_aux_loss_coeff * aux + c.moe_z_loss_coeff * z, scale)
        if self.sequence_parallel:
            weights_all = C.gather_from_sequence_parallel_region(weights, self.tp)  # [N, k]
        else:
            weights_all = C.copy_to_tensor_parallel_region(weights, self.tp)  # [N, k]
        self._record(aux, z, tokens_per_expert)

        keep = None
        if c.moe_expert_capacity_factor is not None:
            cap = expert_capacity(num_tokens, c.moe_router_topk, c.num_experts, c.moe_expert_capacity_factor)
            keep = capacity_keep_mask(weights_all, indices_all, c.num_experts, cap)  # [N, k]

        rows, tokens_per_local = self.dispatcher.dispatch(x_all, indices_all, keep)  # [T, h] by local expert
        expert_out = self.experts(rows, tokens_per_local)  # [T, h], partial over TP
        y = self.dispatcher.combine(expert_out, weights_all).to(hidden.dtype)  # [N, h], partial over TP

        # Leave the TP region: each TP rank holds its ffn slice's share of every token's output.
        y = y.view(-1, b, h)  # [s, b, h]
        if self.sequence_parallel:
            y = C.reduce_scatter_to_sequence_parallel_region(y, self.tp)  # [s/tp, b, h]
        else:
            y = C.reduce_from_tensor_parallel_region(y, self.tp)  # [s, b, h]
        if self.shared_experts is not None:
            y = y + self.shared_experts(hidden)  # [s(/tp), b, h]
        return y

    def _record(self, aux, z, tokens_per_expert):
        """Statistics for the tracker and the expert-bias load, training forwards only.

        Recomputation (a forward inside backward) and no-grad evaluation are skipped so each routed
        token counts once. What is recorded sums over the world to the true value: under SP the
        aux/z parts are per shard (every TP rank adds its part) while the counts already cover the
        TP group (TP rank 0 adds them); without SP all TP ranks agree, so TP rank 0 adds everything.
        """
        if not torch.is_grad_enabled() or _in_backward():
            return
        self.router.accumulate_load(tokens_per_expert)
        if self.tracker is None:
            return
        first = self.tp.rank == 0
        shard_parts = self.sequence_parallel or first
        self.tracker.record(self.layer_number, aux=aux.detach() if shard_parts else None,
                            z=z.detach() if shard_parts else None,
                            tokens_per_expert=tokens_per_expert if first else None)
