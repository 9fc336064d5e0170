"""Training FLOPs per token of a GPT, for TFLOP/s per device and model FLOPs utilisation (MFU).

Counts matrix multiplies only (2 FLOPs per multiply-add); norms, softmax, activations and the
embedding lookup are left out, as Megatron and the MFU literature do.
"""
from megahet.errors import MegahetError


def transformer_flops_per_token(num_layers: int, hidden: int, ffn_hidden: int, num_heads: int,
                                num_query_groups: int | None, seq_length: int, vocab_size: int,
                                swiglu: bool, num_experts: int | None, topk: int,
                                moe_ffn_hidden: int | None, shared_expert_ffn: int | None,
                                moe_layer_freq: int | list[bool] | None,
                                recompute_full: bool = False) -> float:
    """Forward + backward FLOPs for one token of a training step.

    Per layer, forward (d = hidden / num_heads, kv = num_query_groups * d):
      - QKV projection 2*h*(num_heads*d + 2*kv), output projection 2*num_heads*d*h;
      - core attention: QK^T and attention x V are each 2*num_heads*d*s per token for a full mask; the
        causal mask leaves on average s/2 keys per query, so together they cost 2*num_heads*d*s;
      - dense MLP 2*h*ffn*(3 if swiglu else 2) (gate+up+down, or up+down);
      - MoE MLP: only the `topk` routed experts a token visits (2*h*moe_ffn*(3|2) each), the shared
        expert if any, and the router 2*h*num_experts.
    Output layer 2*h*vocab once. Backward is twice the forward (data and weight gradients), so training
    is 3x forward. With `recompute_full` the transformer layers run their forward twice (4x): that is
    hardware FLOPs (HFU); leave it False for MFU.

    Args:
        num_query_groups: KV heads (GQA); None means num_heads.
        num_experts: None (or 0) for a dense model.
        moe_ffn_hidden: expert FFN size; None means ffn_hidden.
        shared_expert_ffn: shared expert FFN size; None or 0 when there is none.
        moe_layer_freq: per layer, True where the MLP is MoE; an int N means every N-th layer
            (layer i is MoE when i % N == 0, as Megatron); None means every layer (when MoE).
    """
    groups = num_heads if num_query_groups is None else num_query_groups
    if num_heads < 1 or hidden % num_heads:
        raise MegahetError(f"--hidden-size {hidden} must be divisible by --num-attention-heads "
                           f"{num_heads}")
    if groups < 1 or num_heads % groups:
        raise MegahetError(f"--num-attention-heads {num_heads} must be divisible by "
                           f"--num-query-groups {groups}")
    head_dim = hidden // num_heads
    mlp_mats = 3 if swiglu else 2
    attention = (2 * hidden * (num_heads + 2 * groups) * head_dim    # QKV projection
                 + 2 * num_heads * head_dim * seq_length             # QK^T and AV, causal halving
                 + 2 * num_heads * head_dim * hidden)                # output projection
    dense_mlp = 2 * hidden * ffn_hidden * mlp_mats
    moe_layers = _moe_layer_count(num_layers, num_experts, topk, moe_layer_freq)
    if moe_layers:
        expert_ffn = ffn_hidden if moe_ffn_hidden is None else moe_ffn_hidden
        moe_mlp = (2 * hidden * num_experts                          # router
                   + topk * 2 * hidden * expert_ffn * mlp_mats       # routed experts, active only
                   + 2 * hidden * (shared_expert_ffn or 0) * mlp_mats)
    else:
        moe_mlp = 0
    layers_forward = (num_layers * attention + (num_layers - moe_layers) * dense_mlp
                      + moe_layers * moe_mlp)
    logits_forward = 2 * hidden * vocab_size
    layer_passes = 4 if recompute_full else 3
    return float(layer_passes * layers_forward + 3 * logits_forward)


def _moe_layer_count(num_layers: int, num_experts: int | None, topk: int,
                     moe_layer_freq: int | list[bool] | None) -> int:
    """How many layers have an MoE MLP, after checking the MoE settings agree."""
    if not num_experts:
        return 0
    if not 1 <= topk <= num_experts:
        raise MegahetError(f"--moe-router-topk {topk} must be between 1 and --num-experts "
                           f"{num_experts}")
    if moe_layer_freq is None:
        return num_layers
    if isinstance(moe_layer_freq, int):
        if moe_layer_freq < 1:
            raise MegahetError(f"--moe-layer-freq {moe_layer_freq} must be >= 1")
        return sum(1 for i in range(num_layers) if i % moe_layer_freq == 0)
    if len(moe_layer_freq) != num_layers:
        raise MegahetError(f"--moe-layer-freq lists {len(moe_layer_freq)} layers but --num-layers is "
                           f"{num_layers}; give one entry per layer")
    return sum(bool(x) for x in moe_layer_freq)


def tflops_per_device(flops_per_token: float, tokens_per_s: float, num_devices: int) -> float:
    """Achieved model TFLOP/s per device (the job's total spread evenly over its devices)."""
    return flops_per_token * tokens_per_s / max(num_devices, 1) / 1e12


def model_flops_utilization(flops_per_token: float, tokens_per_s: float,
                            total_peak_flops: float) -> float:
    """MFU as a fraction: achieved FLOP/s over the sum of every device's peak FLOP/s.

    Summing peaks (rather than devices x one peak) keeps MFU meaningful on mixed hardware.
    """
    if total_peak_flops <= 0:
        return 0.0
    return flops_per_token * tokens_per_s / total_peak_flops
