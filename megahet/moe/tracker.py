"""MoETracker: the training loop's one handle on every MoE layer of a rank.

It carries `aux_loss_scale` into the layers (read in forward), collects per-layer router statistics of
the current step, reduces them over the whole job for logging, and applies the aux-loss-free expert
bias update after the optimizer step.

Logged values (Megatron's `load_balancing_loss` convention): `moe_aux_loss` is the load-balancing loss
WITHOUT its coefficient (1.0 = perfectly balanced), token-weighted over the global batch and averaged
over the MoE layers; `moe_z_loss` likewise without its coefficient. They are computed even when the
coefficients are 0, so a run without aux loss still shows its balance.

Loop protocol: `reset()` at the start of each step; before each micro-batch's forward set
`aux_loss_scale` = its loss tokens / the global batch's loss tokens (and, when activations are
recomputed, again before its backward, since recomputation re-reads it); after the step every rank
calls `report(ctx)` (a collective) when logging and `update_expert_bias(ctx)` after `optimizer.step()`.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megahet.errors import MegahetError


class MoETracker:
    """Per-step MoE statistics and hooks for every MoE layer of this rank.

    Args:
        num_layers: layers of the whole model (all pipeline stages).
        moe_layer_ids: global indices of every MoE layer of the model (the same list on every rank).
        num_experts: routed experts per MoE layer.
    """

    def __init__(self, num_layers: int, moe_layer_ids: List[int], num_experts: int):
        ids = sorted(int(i) for i in moe_layer_ids)
        if any(i < 0 or i >= num_layers for i in ids) or len(set(ids)) != len(ids):
            raise MegahetError(f"MoETracker: MoE layer ids {ids} must be distinct and in [0, {num_layers}); "
                               f"pass the global ids of the MoE layers")
        self.num_layers, self.moe_layer_ids, self.num_experts = num_layers, ids, num_experts
        self._slot = {layer: i for i, layer in enumerate(ids)}
        self.aux_loss_scale: float = 1.0
        self.layers: Dict[int, torch.nn.Module] = {}  # global id -> MoELayer on this rank
        self.reset()

    @classmethod
    def from_config(cls, cfg) -> Optional["MoETracker"]:
        """The tracker for a ModelConfig's MoE layers (None for a dense model)."""
        if not cfg.num_experts:
            return None
        from megahet.models.transformer import is_moe_layer  # the model decides which layers are MoE
        ids = [i for i in range(cfg.num_layers) if is_moe_layer(cfg, i)]
        return cls(cfg.num_layers, ids, cfg.num_experts)

    def register(self, layer_number: int, layer: torch.nn.Module) -> None:
        """Called by each MoELayer at construction."""
        if layer_number not in self._slot:
            raise MegahetError(f"MoE layer {layer_number} is not in the tracker's moe_layer_ids {self.moe_layer_ids}; "
                               f"build MoETracker with every MoE layer id of the model")
        self.layers[layer_number] = layer

    def reset(self) -> None:
        """Forget the statistics of the previous step (call at the start of each step)."""
        # (slot, aux, z, tokens_per_expert, scale) as recorded: left on the device so forward never
        # waits for it; only `report` (a logging step) reads them back.
        self._records: List[tuple] = []

    @torch.no_grad()
    def record(self, layer_number: int, aux: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
               tokens_per_expert: Optional[torch.Tensor] = None) -> None:
        """Add one micro-batch's contribution. aux/z are weighted by `aux_loss_scale` here; a layer
        passes only the parts that, summed over the world, give the true value (see MoELayer)."""
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        self._records.append((self._slot[layer_number], detach(aux), detach(z), detach(tokens_per_expert),
                              self.aux_loss_scale))

    def _totals(self):
        """This rank's per-layer sums (fp64, host) of the recorded aux, z and tokens per expert."""
        n = len(self.moe_layer_ids)
        aux, z = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        tokens = torch.zeros(n, self.num_experts, dtype=torch.float64)
        for i, a, zz, t, scale in self._records:
            if a is not None:
                aux[i] += float(a) * scale
            if zz is not None:
                z[i] += float(zz) * scale
            if t is not None:
                tokens[i] += t.double().cpu()
        return aux, z, tokens

    def report(self, ctx) -> dict:
        """Statistics of the step summed over every rank (collective over ctx.world_group: all call it).

        Returns `moe_aux_loss`, `moe_z_loss` (floats, see module docstring), and per MoE layer
        `moe/layer_{i}/aux_loss`, `moe/layer_{i}/tokens_per_expert` (list of ints over the global batch)
        and `moe/layer_{i}/load_imbalance` (max / mean tokens per expert; 1.0 = balanced).
        """
        n, e = len(self.moe_layer_ids), self.num_experts
        # One fixed-size tensor per rank: layers held elsewhere are zeros, so shapes match everywhere.
        aux, z, tokens = self._totals()
        flat = torch.cat([aux, z, tokens.reshape(-1)]).to(ctx.world_group.device)  # [2n + n*E]
        flat = ctx.world_group.all_reduce(flat).cpu()
        aux, z, tokens = flat[:n], flat[n:2 * n], flat[2 * n:].view(n, e)
        out = {"moe_aux_loss": float(aux.mean()) if n else 0.0, "moe_z_loss": float(z.mean()) if n else 0.0}
        for slot, layer in enumerate(self.moe_layer_ids):
            counts = tokens[slot]
            mean = float(counts.mean())
            out[f"moe/layer_{layer}/aux_loss"] = float(aux[slot])
            out[f"moe/layer_{layer}/tokens_per_expert"] = [int(round(c)) for c in counts.tolist()]
            out[f"moe/layer_{layer}/load_imbalance"] = float(counts.max()) / mean if mean > 0 else 0.0
        # One number for the console line: the worst layer's imbalance.
        out["moe_load_imbalance"] = max((out[f"moe/layer_{layer}/load_imbalance"] for layer in self.moe_layer_ids),
                                        default=0.0)
        return out

    @torch.no_grad()
    def update_expert_bias(self, ctx) -> None:
        """Aux-loss-free balancing: one bias step per MoE layer from the load routed since the last call.

        Each layer's accumulated load already covers all tokens of its tensor-parallel group (the
        layer routes the TP-gathered tokens), so summing over the data-parallel group (which contains
        the expert-parallel ranks) gives the stage's global load: every replica applies the same step.
        """
        routers = [self.layers[i].router for i in sorted(self.layers)
                   if self.layers[i].router.expert_bias is not None]
        if not routers:
            return
        load = torch.stack([r.local_tokens_per_expert for r in routers]).float()  # [L, E]
        load = ctx.dp_group.all_reduce(load.to(ctx.dp_group.device)).to(load.device)
        for r, row in zip(routers, load):
            r.update_bias(row)
