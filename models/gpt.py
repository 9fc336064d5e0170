"""GPT / Llama-style decoder (dense or MoE), one pipeline chunk of it per instance.

A chunk holds a contiguous range of global layers; the first chunk of the pipeline also holds the
embedding, the last one the final norm, the output layer and the loss. Parameter names are the
unsharded model's names (`decoder.layers.<global index>...`), which checkpoints and resharding rely on.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megahet.config import ModelConfig
from megahet.parallel import collectives as C
from megahet.parallel.context import ParallelContext
from megahet.parallel.init import init_full_normal
from megahet.parallel.tensor_parallel import (ColumnParallelLinear, VocabParallelEmbedding, padded_vocab_weight,
                                               tp_parameter, vocab_parallel_cross_entropy)
from megahet.models.transformer import Norm, TransformerLayer, rotary_tables

EMBEDDING_WEIGHT = "embedding.word_embeddings.weight"


class Embedding(nn.Module):
    """Word embeddings (vocab-parallel) plus optional learned absolute positions; output [s(/tp), b, h]."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, vocab_size: int, padded_vocab_size: int, seed: int,
                 sequence_parallel: bool, dtype, device):
        super().__init__()
        self.ctx, self.sequence_parallel = ctx, sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(vocab_size, padded_vocab_size, cfg.hidden_size,
                                                      group=ctx.tp_group, name="embedding.word_embeddings", seed=seed,
                                                      init_std=cfg.init_method_std,
                                                      sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        self.position_embeddings = None
        if cfg.position_embedding_type == "learned_absolute":
            full = init_full_normal((cfg.max_position_embeddings, cfg.hidden_size), cfg.init_method_std, seed,
                                    "embedding.position_embeddings.weight")
            self.position_embeddings = nn.Parameter(full.to(device=device, dtype=dtype))
            # Each rank adds positions to its own sequence shard: grads are partial under SP.
            self.position_embeddings.sequence_parallel = sequence_parallel

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(tokens)  # [s(/tp), b, h]
        if self.position_embeddings is not None:
            s_local = h.shape[0]
            start = self.ctx.tp_group.rank * s_local if self.sequence_parallel else 0  # this rank's sequence shard
            h = h + self.position_embeddings[start:start + s_local].unsqueeze(1)
        return h


class GPTModel(nn.Module):
    """One pipeline chunk of the GPT model.

    Args:
        cfg: model architecture.
        ctx: this rank's parallel context (groups, kernels, device).
        layer_ids: global indices of the transformer layers this chunk holds.
        pre_process: holds the embedding (first chunk of the pipeline).
        post_process: holds final norm, output layer and loss (last chunk).
        vocab_size / padded_vocab_size: real and padded vocabulary (padded logits are masked).
        sequence_parallel: Megatron sequence parallelism inside TP regions.
        seed: weights come from (seed, parameter name): identical under every layout.
        recompute: None, "full" (listed units are recomputed in backward) or "selective" (attention core).
        recompute_units: groups of consecutive global layer indices, each checkpointed as one unit
            (only the unit's input is kept for backward).
        moe_tracker: collects router statistics and aux losses of this chunk's MoE layers.
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, *, layer_ids: Sequence[int], pre_process: bool,
                 post_process: bool, vocab_size: int, padded_vocab_size: int, sequence_parallel: bool = False,
                 seed: int = 1234, dtype=torch.float32, recompute: Optional[str] = None,
                 recompute_units: Sequence[Sequence[int]] = (), moe_tracker=None):
        super().__init__()
        device = ctx.device
        self.cfg, self.ctx = cfg, ctx
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = sequence_parallel and ctx.tp_group.size > 1
        self.sequence_parallel_flag = bool(sequence_parallel)  # the job's flag: neighbours' layouts follow it
        self.vocab_size, self.padded_vocab_size = vocab_size, padded_vocab_size
        self.vocab_start = ctx.tp_group.rank * (padded_vocab_size // ctx.tp_group.size)  # of this rank's logits
        self.layer_ids = list(layer_ids)
        # First layer of a unit -> the unit's layers.
        self.recompute_units = {u[0]: list(u) for u in recompute_units if u} if recompute == "full" else {}
        self.tied = not cfg.untie_embeddings_and_output_weights
        if pre_process:
            self.embedding = Embedding(cfg, ctx, vocab_size, padded_vocab_size, seed, self.sequence_parallel, dtype, device)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleDict({
            str(i): TransformerLayer(cfg, ctx, i, seed, self.sequence_parallel, dtype, device, moe_tracker)
            for i in self.layer_ids})
        if recompute == "selective":
            for layer in self.decoder.layers.values():
                layer.self_attention.recompute_core = True
        self.rope = None
        if cfg.position_embedding_type == "rope":
            self.rope = rotary_tables(cfg.max_position_embeddings, cfg.kv_channels, cfg.rotary_base, device, cfg)
        if post_process:
            self.decoder.final_layernorm = Norm(cfg, ctx, self.sequence_parallel, dtype, device)
            # Tied and the embedding lives on another stage: keep a copy initialised identically,
            # kept in sync by summing both copies' gradients over the embedding group.
            own_output = not self.tied or not pre_process
            name = "output_layer" if not self.tied else "embedding.word_embeddings"
            self.output_layer = ColumnParallelLinear(
                cfg.hidden_size, padded_vocab_size, group=ctx.tp_group, name=name, seed=seed,
                init_std=cfg.init_method_std, sequence_parallel=self.sequence_parallel, dtype=dtype, device=device,
                create_weight=False)
            if own_output:  # padding rows zero, as the embedding's
                full = padded_vocab_weight(vocab_size, padded_vocab_size, cfg.hidden_size, cfg.init_method_std, seed,
                                           f"{name}.weight")
                self.output_layer.weight = tp_parameter(full, ctx.tp_group, 0, 1, dtype, device)
        for pname, p in self.named_parameters():
            p.global_name = pname
        # Checkpoints store only the real vocabulary rows: padding depends on the layout.
        if pre_process:
            self.embedding.word_embeddings.weight.vocab_dim = 0
        if post_process and self.output_layer.weight is not None:
            self.output_layer.weight.vocab_dim = 0
        if post_process and self.tied and not pre_process:
            self.output_layer.weight.global_name = EMBEDDING_WEIGHT
            self.output_layer.weight.shared_embedding = True
        if pre_process and self.tied and ctx.pp > 1:
            self.embedding.word_embeddings.weight.shared_embedding = True
        self._input_tensor = None

    def _run_layers(self, layers, h):
        for layer in layers:
            h = layer(h, self.rope)
        return h

    def output_weight(self) -> torch.Tensor:
        if self.output_layer.weight is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def forward(self, tokens: Optional[torch.Tensor] = None, hidden_states: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [b, s] (first chunk) or hidden_states [s(/tp), b, h] (later chunks).

        Returns hidden states [s(/tp), b, h] (not last chunk), per-token loss [b, s] fp32 (last chunk
        with labels) or logits [b, s, vocab] (last chunk without labels; padding removed, TP gathered).
        """
        h = self.embedding(tokens) if self.pre_process else hidden_states
        layers = list(self.decoder.layers.values())
        i = 0
        while i < len(layers):
            unit = self.recompute_units.get(layers[i].layer_number)
            if unit and torch.is_grad_enabled():
                h = checkpoint(self._run_layers, layers[i:i + len(unit)], h, use_reentrant=False)
                i += len(unit)
            else:
                h = layers[i](h, self.rope)
                i += 1
        if not self.post_process:
            return h
        h = self.decoder.final_layernorm(h)
        logits = self.output_layer(h, weight=self.output_weight())  # [s, b, v/tp]
        if labels is None:
            full = C.gather_from_tensor_parallel_region(logits, self.ctx.tp_group)  # [s, b, v_pad]
            return full[..., :self.vocab_size].transpose(0, 1).float()  # [b, s, v]
        loss = vocab_parallel_cross_entropy(logits, labels.t(), self.ctx.tp_group, self.vocab_start,
                                            self.vocab_size)  # [s, b]
        return loss.t()  # [b, s]

