"""FLOPs per token: a tiny config counted by hand, and agreement with Megatron's formula."""
import pytest

from megahet.errors import MegahetError
from megahet.training.flops import (model_flops_utilization, tflops_per_device,
                                    transformer_flops_per_token)

# 2 layers, h=8, ffn=16, 2 heads (d=4), 1 KV group, s=4, vocab=10.
TINY = dict(num_layers=2, hidden=8, ffn_hidden=16, num_heads=2, num_query_groups=1, seq_length=4,
            vocab_size=10, swiglu=False, num_experts=None, topk=1, moe_ffn_hidden=None,
            shared_expert_ffn=None, moe_layer_freq=None)


def test_dense_tiny_by_hand():
    # per layer fwd: QKV 2*8*(2+2)*4=256, QK^T+AV causal 2*2*4*4=64, out 2*8*8=128, MLP 2*8*16*2=512
    # logits 2*8*10=160; training = 3 * (2*960 + 160)
    assert transformer_flops_per_token(**TINY) == 6240.0
    assert transformer_flops_per_token(**TINY, recompute_full=True) == 4 * 1920 + 3 * 160


def test_moe_counts_only_active_experts():
    cfg = dict(TINY, swiglu=True, num_experts=4, topk=2, moe_ffn_hidden=6, shared_expert_ffn=4,
               moe_layer_freq=[True, False])
    # attention 448 per layer; dense swiglu MLP 2*8*16*3=768; MoE: router 2*8*4=64,
    # 2 experts 2*2*8*6*3=576, shared 2*8*4*3=192 -> 832
    assert transformer_flops_per_token(**cfg) == 3 * (2 * 448 + 768 + 832) + 3 * 160
    assert transformer_flops_per_token(**dict(cfg, moe_layer_freq=2)) == transformer_flops_per_token(
        **cfg)  # every 2nd layer from layer 0 = [True, False]
    more_experts = dict(cfg, num_experts=8)  # only the router grows with the expert count
    assert transformer_flops_per_token(**more_experts) - transformer_flops_per_token(**cfg) == 3 * 64


def test_matches_megatron_formula_without_causal_halving():
    cfg = dict(TINY, num_layers=4, hidden=64, ffn_hidden=256, num_heads=8, num_query_groups=2,
               seq_length=128, vocab_size=1000, swiglu=True)
    L, h, s, n, g, f, V = 4, 64, 128, 8, 2, 256, 1000
    megatron = 12 * L * h * h * (1 + g / n + s / h + f / h * 1.5 + V / (2 * L * h))
    causal_saving = 3 * L * 2 * h * s  # Megatron counts the full s x s attention matrix
    assert transformer_flops_per_token(**cfg) == pytest.approx(megatron - causal_saving)


def test_throughput_helpers():
    assert tflops_per_device(1e9, 2e3, num_devices=4) == pytest.approx(0.5)
    assert model_flops_utilization(1e9, 2e3, total_peak_flops=4e12) == pytest.approx(0.5)


@pytest.mark.parametrize("kw, flag", [
    (dict(num_heads=3), "--num-attention-heads"),
    (dict(num_query_groups=3), "--num-query-groups"),
    (dict(num_experts=4, topk=5), "--moe-router-topk"),
    (dict(num_experts=4, moe_layer_freq=[True]), "--moe-layer-freq"),
    (dict(num_experts=4, moe_layer_freq=0), "--moe-layer-freq"),
])
def test_bad_config_names_the_flag(kw, flag):
    with pytest.raises(MegahetError, match=flag):
        transformer_flops_per_token(**dict(TINY, **kw))
