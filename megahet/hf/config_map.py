"""Architecture settings between a Hugging Face config.json and megahet's ModelConfig fields.

Only what both sides express exactly is mapped; anything else is a one-line error naming the feature.
"""
from __future__ import annotations

from megahet.errors import MegahetError

DENSE = ("LlamaForCausalLM", "Qwen3ForCausalLM")
MOE = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
SUPPORTED = DENSE + MOE


def _rope(hf: dict) -> dict:
    """rope_theta / rope_scaling (transformers 4) or rope_parameters (transformers 5) -> megahet fields."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = params if params else dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    out = {"rotary_base": float(theta), "position_embedding_type": "rope"}
    if kind == "llama3":
        out.update(use_rope_scaling=True, rope_scaling_factor=float(scaling["factor"]),
                   rope_scaling_low_freq_factor=float(scaling["low_freq_factor"]),
                   rope_scaling_high_freq_factor=float(scaling["high_freq_factor"]),
                   rope_scaling_original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    elif kind != "default":
        raise MegahetError(f"RoPE scaling of type {kind!r} cannot be converted (megahet has llama3 scaling only)")
    return out


def hf_to_model_fields(hf: dict) -> dict:
    """megahet ModelConfig fields for the Hugging Face config `hf` (a parsed config.json)."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise MegahetError(f"architecture {arch} is not supported; convert one of {', '.join(SUPPORTED)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise MegahetError(f"activation {hf['hidden_act']!r} cannot be converted (megahet's SwiGLU uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise MegahetError(f"{flag}=true cannot be converted: megahet has biases on all linears or none")
    if hf.get("use_sliding_window") or (hf.get("sliding_window") and arch != "Qwen3MoeForCausalLM"
                                        and arch != "Qwen3ForCausalLM"):
        raise MegahetError("sliding-window attention cannot be converted (megahet attends to the whole sequence)")
    heads = int(hf["num_attention_heads"])
    max_positions = int(hf.get("max_position_embeddings", 4096))
    fields = dict(
        num_layers=int(hf["num_hidden_layers"]), hidden_size=int(hf["hidden_size"]), num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        ffn_hidden_size=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=max_positions, seq_length=min(max_positions, 4096),
        normalization="RMSNorm", norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), swiglu=True,
        disable_bias_linear=True, untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        qk_layernorm=arch.startswith("Qwen3"), **_rope(hf))
    fields["group_query_attention"] = fields["num_query_groups"] != heads
    if arch == "MixtralForCausalLM":
        fields.update(num_experts=int(hf["num_local_experts"]), moe_router_topk=int(hf["num_experts_per_tok"]),
                      moe_ffn_hidden_size=int(hf["intermediate_size"]), moe_router_score_function="softmax",
                      moe_router_pre_softmax=False, moe_layer_freq=1)
    elif arch == "Qwen3MoeForCausalLM":
        experts = int(hf.get("num_experts") or hf.get("num_local_experts"))
        step, dense = int(hf.get("decoder_sparse_step", 1)), set(hf.get("mlp_only_layers") or [])
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(fields["num_layers"])]
        fields.update(num_experts=experts, moe_router_topk=int(hf["num_experts_per_tok"]),
                      moe_ffn_hidden_size=int(hf["moe_intermediate_size"]), moe_router_score_function="softmax",
                      moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
                      moe_layer_freq=pattern if 0 in pattern else 1)
    return fields


def moe_pattern(m) -> list:
    """1 where layer i of megahet model config `m` is MoE, else 0."""
    from megahet.models.transformer import is_moe_layer
    return [int(is_moe_layer(m, i)) for i in range(m.num_layers)]


def _inexpressible(m, arch: str) -> list:
    """Features of megahet model config `m` that Hugging Face's `arch` cannot express."""
    problems = []
    if m.normalization != "RMSNorm":
        problems.append("LayerNorm")
    if not m.swiglu:
        problems.append("a GeLU MLP")
    if not m.disable_bias_linear:
        problems.append("linear biases")
    if m.position_embedding_type != "rope":
        problems.append("learned absolute positions")
    if m.num_experts:
        if m.moe_shared_expert_intermediate_size:
            problems.append("a shared expert")
        if m.moe_router_score_function != "softmax":
            problems.append("a sigmoid router")
        if m.moe_router_num_groups:
            problems.append("group-limited routing")
        if m.moe_router_topk_scaling_factor:
            problems.append("a top-k scaling factor")
        if m.moe_router_enable_expert_bias:
            problems.append("the aux-loss-free expert bias")
        if arch == "MixtralForCausalLM":
            if m.moe_router_pre_softmax:
                problems.append("top-k weights without renormalisation")
            if 0 in moe_pattern(m):
                problems.append("dense layers between MoE layers")
    if arch in ("LlamaForCausalLM", "MixtralForCausalLM") and m.qk_layernorm:
        problems.append("per-head query/key norms")
    if arch.startswith("Qwen3") and not m.qk_layernorm:
        problems.append("attention without per-head query/key norms")
    return problems


def choose_architecture(m) -> str:
    """The Hugging Face architecture that expresses megahet model config `m` (Llama/Mixtral first)."""
    if not m.num_experts:
        candidates = ("LlamaForCausalLM", "Qwen3ForCausalLM")
    else:
        candidates = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
    for arch in candidates:
        if not _inexpressible(m, arch):
            return arch
    raise MegahetError(f"{' and '.join(_inexpressible(m, candidates[0]))} cannot be exported to "
                       f"{candidates[0]}, nor {' and '.join(_inexpressible(m, candidates[1]))} to {candidates[1]}")


def model_to_hf_config(m, vocab_size: int, arch: str) -> dict:
    """config.json for megahet model config `m` as `arch` (transformers 4 and 5 both read it)."""
    problems = _inexpressible(m, arch)
    if problems:
        raise MegahetError(f"{' and '.join(problems)} cannot be exported to {arch}")
    model_type = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral",
                  "Qwen3MoeForCausalLM": "qwen3_moe"}[arch]
    hf = dict(architectures=[arch], model_type=model_type, vocab_size=vocab_size, hidden_size=m.hidden_size,
              intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
              num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
              head_dim=m.kv_channels, max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
              hidden_act="silu", tie_word_embeddings=not m.untie_embeddings_and_output_weights,
              attention_bias=False, rope_theta=m.rotary_base, torch_dtype="float32")
    rope = {"rope_type": "default", "rope_theta": m.rotary_base}
    if m.use_rope_scaling:
        rope = {"rope_type": "llama3", "factor": m.rope_scaling_factor, "rope_theta": m.rotary_base,
                "low_freq_factor": m.rope_scaling_low_freq_factor, "high_freq_factor": m.rope_scaling_high_freq_factor,
                "original_max_position_embeddings": m.rope_scaling_original_max_position_embeddings}
        hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    hf["rope_parameters"] = rope
    if arch == "MixtralForCausalLM":
        hf.update(num_local_experts=m.num_experts, num_experts_per_tok=m.moe_router_topk,
                  intermediate_size=m.moe_ffn_hidden_size, sliding_window=None)
    elif arch == "Qwen3MoeForCausalLM":
        pattern = moe_pattern(m)
        hf.update(num_experts=m.num_experts, num_experts_per_tok=m.moe_router_topk,
                  moe_intermediate_size=m.moe_ffn_hidden_size, decoder_sparse_step=1,
                  mlp_only_layers=[i for i, moe in enumerate(pattern) if not moe],
                  norm_topk_prob=not m.moe_router_pre_softmax, use_sliding_window=False)
    return hf
