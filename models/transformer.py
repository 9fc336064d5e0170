"""Transformer blocks of the GPT model: norm, attention, MLP, layer.

The model files describe the architecture only: parallel layers come from megahet.parallel, kernels
from the rank's backend (`ctx.kernels`), never from a vendor module.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megahet.config import ModelConfig
from megahet.parallel.context import ParallelContext
from megahet.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the hidden dim, computed by the backend's kernel.

    Its weights are replicated across TP; under sequence parallelism each rank sees a different
    sequence shard, so the weights are flagged `sequence_parallel` and their grads are summed over TP.
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, sequence_parallel: bool, dtype, device,
                 size: Optional[int] = None):
        super().__init__()
        size = size or cfg.hidden_size
        self.kind, self.eps, self.kernels = cfg.normalization, cfg.norm_epsilon, ctx.kernels
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.weight.sequence_parallel = sequence_parallel
        self.bias = None
        if self.kind == "LayerNorm":
            self.bias = nn.Parameter(torch.zeros(size, dtype=dtype, device=device))
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x):
        if self.kind == "RMSNorm":
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.kernels.layer_norm(x, self.weight, self.bias, self.eps)


def init_stds(cfg: ModelConfig) -> Tuple[float, float]:
    """Init std of input projections and of output projections (scaled by depth, as Megatron)."""
    return cfg.init_method_std, cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)


def ffn_activation(h: torch.Tensor, swiglu: bool, kernels) -> torch.Tensor:
    """SwiGLU over the [gate; up] halves of the last dim, or GeLU. [..., chunks*f] -> [..., f]."""
    if swiglu:
        gate, up = h.chunk(2, dim=-1)  # [..., f] each
        return kernels.swiglu(gate, up)
    return F.gelu(h)


def llama3_scaled_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                              high_freq_factor: float, original_max_positions: int) -> torch.Tensor:
    """Llama 3 RoPE scaling (HF rope_scaling type "llama3"): long wavelengths are divided by `factor`,
    short ones kept, the band between interpolated smoothly. [d/2] -> [d/2]."""
    low_freq_wavelen = original_max_positions / low_freq_factor
    high_freq_wavelen = original_max_positions / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(seq_len: int, dim: int, base: float, device,
                  cfg: Optional[ModelConfig] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [s, 1, 1, d] (fp32) for the rotate-half RoPE convention (HF Llama compatible), with
    Llama 3 frequency scaling when `cfg.use_rope_scaling`."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if cfg is not None and cfg.use_rope_scaling:
        inv_freq = llama3_scaled_frequencies(inv_freq, cfg.rope_scaling_factor, cfg.rope_scaling_low_freq_factor,
                                             cfg.rope_scaling_high_freq_factor,
                                             cfg.rope_scaling_original_max_position_embeddings)
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # [s, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [s, d]
    return emb.cos()[:, None, None, :], emb.sin()[:, None, None, :]


class SelfAttention(nn.Module):
    """Causal self-attention with grouped-query heads, TP-split by query group.

    The fused QKV weight is laid out per query group: [q heads of group g, k_g, v_g] for g in groups,
    so a contiguous row split gives each TP rank whole groups.
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, prefix: str, seed: int, sequence_parallel: bool,
                 dtype, device):
        super().__init__()
        tp = ctx.tp_group.size
        self.kernels = ctx.kernels
        self.head_dim = cfg.kv_channels
        self.groups_local = cfg.num_query_groups // tp
        self.q_per_group = cfg.num_attention_heads // cfg.num_query_groups
        self.heads_local = cfg.num_attention_heads // tp
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim)
        self.use_rope = cfg.position_embedding_type == "rope"
        qkv_size = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * self.head_dim
        bias = not cfg.disable_bias_linear
        std, out_std = init_stds(cfg)
        self.linear_qkv = ColumnParallelLinear(cfg.hidden_size, qkv_size, group=ctx.tp_group, name=f"{prefix}.linear_qkv",
                                               seed=seed, init_std=std, bias=bias, sequence_parallel=sequence_parallel,
                                               dtype=dtype, device=device)
        self.linear_proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size,
                                             group=ctx.tp_group, name=f"{prefix}.linear_proj", seed=seed,
                                             init_std=out_std, bias=bias, sequence_parallel=sequence_parallel,
                                             dtype=dtype, device=device)
        self.q_layernorm = self.k_layernorm = None
        if cfg.qk_layernorm:  # one weight shared by all heads; TP ranks see different heads, so sum grads
            self.q_layernorm = Norm(cfg, ctx, tp > 1, dtype, device, size=self.head_dim)
            self.k_layernorm = Norm(cfg, ctx, tp > 1, dtype, device, size=self.head_dim)
        self.recompute_core = False

    def _core(self, q, k, v):
        # [s, b, n, d] -> [b, s, n, d] for the kernel (BSND), and back.
        out = self.kernels.causal_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), self.softmax_scale)
        return out.transpose(0, 1)  # [s, b, nq/tp, d]

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        qkv = self.linear_qkv(x)  # [s, b, (nq + 2 nkv)/tp * d]
        s, b = qkv.shape[0], qkv.shape[1]
        qkv = qkv.view(s, b, self.groups_local, (self.q_per_group + 2) * self.head_dim)
        q, k, v = qkv.split([self.q_per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(s, b, self.heads_local, self.head_dim)  # [s, b, nq/tp, d]
        k = k.reshape(s, b, self.groups_local, self.head_dim)  # [s, b, nkv/tp, d]
        v = v.reshape(s, b, self.groups_local, self.head_dim)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)  # per head, over d
        if self.use_rope:
            cos, sin = rope
            q = self.kernels.apply_rotary(q, cos[:s], sin[:s])
            k = self.kernels.apply_rotary(k, cos[:s], sin[:s])
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, use_reentrant=False)  # selective recompute: attention only
        else:
            out = self._core(q, k, v)  # [s, b, nq/tp, d]
        return self.linear_proj(out.reshape(s, b, self.heads_local * self.head_dim))  # [s(/tp), b, h]


class MLP(nn.Module):
    """Dense feed-forward: SwiGLU ([gate; up] fused, split per TP rank block-wise) or GeLU."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, prefix: str, seed: int, sequence_parallel: bool,
                 dtype, device, ffn_hidden_size: Optional[int] = None):
        super().__init__()
        ffn = ffn_hidden_size or cfg.ffn_hidden_size
        self.swiglu, self.kernels = cfg.swiglu, ctx.kernels
        bias = not cfg.disable_bias_linear
        std, out_std = init_stds(cfg)
        chunks = 2 if cfg.swiglu else 1
        self.linear_fc1 = ColumnParallelLinear(cfg.hidden_size, ffn * chunks, group=ctx.tp_group,
                                               name=f"{prefix}.linear_fc1", seed=seed, init_std=std, bias=bias,
                                               sequence_parallel=sequence_parallel, chunks=chunks, dtype=dtype,
                                               device=device)
        self.linear_fc2 = RowParallelLinear(ffn, cfg.hidden_size, group=ctx.tp_group, name=f"{prefix}.linear_fc2",
                                            seed=seed, init_std=out_std, bias=bias,
                                            sequence_parallel=sequence_parallel, dtype=dtype, device=device)

    def forward(self, x):
        h = self.linear_fc1(x)  # [s, b, chunks * ffn/tp]
        return self.linear_fc2(ffn_activation(h, self.swiglu, self.kernels))  # [s, b, ffn/tp] -> [s(/tp), b, h]


def is_moe_layer(cfg: ModelConfig, layer_number: int) -> bool:
    """Layer `layer_number` (0-based, global) is MoE every `moe_layer_freq` layers, or where the
    `moe_layer_freq` list (one 0/1 per layer, Megatron's list form) has a 1."""
    if not cfg.num_experts:
        return False
    if isinstance(cfg.moe_layer_freq, list):
        return bool(cfg.moe_layer_freq[layer_number])
    return layer_number % max(1, cfg.moe_layer_freq) == 0


class TransformerLayer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)). Input/output [s(/tp), b, h]."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layer_number: int, seed: int, sequence_parallel: bool,
                 dtype, device, moe_tracker=None):
        super().__init__()
        prefix = f"decoder.layers.{layer_number}"
        self.layer_number = layer_number
        self.input_layernorm = Norm(cfg, ctx, sequence_parallel, dtype, device)
        self.self_attention = SelfAttention(cfg, ctx, f"{prefix}.self_attention", seed, sequence_parallel, dtype, device)
        self.pre_mlp_layernorm = Norm(cfg, ctx, sequence_parallel, dtype, device)
        if is_moe_layer(cfg, layer_number):
            from megahet.moe.layer import MoELayer
            self.mlp = MoELayer(cfg, ctx, f"{prefix}.mlp", layer_number, seed, sequence_parallel, dtype, device,
                                moe_tracker)
        else:
            self.mlp = MLP(cfg, ctx, f"{prefix}.mlp", seed, sequence_parallel, dtype, device)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), rope)
        return x + self.mlp(self.pre_mlp_layernorm(x))
