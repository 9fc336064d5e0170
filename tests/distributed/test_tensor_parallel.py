"""TP=2 and TP=4, with and without sequence parallelism, match the single-process model."""
import pytest
import torch

from megahet.testing import run_distributed
from tests.distributed.tp_cases import run_tp


@pytest.fixture(scope="module")
def reference():
    return run_distributed(run_tp, 1, 1, False, timeout=60)[0]


def _compare(ref, got, atol=1e-5):
    torch.testing.assert_close(got["losses"], ref["losses"], atol=atol, rtol=1e-5)
    torch.testing.assert_close(got["logits"], ref["logits"], atol=atol, rtol=1e-5)
    assert set(got["weights"]) == set(ref["weights"])
    for name in ref["weights"]:
        torch.testing.assert_close(got["weights"][name], ref["weights"][name], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(got["grads"][name], ref["grads"][name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_tensor_parallel_matches_single_process(reference, tp, sp):
    got = run_distributed(run_tp, tp, tp, sp, timeout=90)[0]
    _compare(reference, got)


def test_learned_positions_layernorm_gelu_untied_bias(tmp_path):
    over = dict(position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False,
                untie_embeddings_and_output_weights=True, disable_bias_linear=False)
    ref = run_distributed(run_tp, 1, 1, False, over, timeout=60)[0]
    got = run_distributed(run_tp, 2, 2, True, over, timeout=60)[0]
    _compare(ref, got)


def test_qk_layernorm_rope_scaling_moe_pattern(tmp_path):
    """Issue 11's model features under TP2 + SP: per-head q/k norms (their grads summed over TP),
    Llama 3 RoPE scaling, a list-form MoE layer pattern and sigmoid routing without renormalisation."""
    over = dict(qk_layernorm=True, use_rope_scaling=True, rope_scaling_factor=4.0,
                rope_scaling_original_max_position_embeddings=8, num_experts=4, moe_router_topk=2,
                moe_layer_freq=[0, 1], moe_router_score_function="sigmoid", moe_router_pre_softmax=True)
    ref = run_distributed(run_tp, 1, 1, False, over, timeout=60)[0]
    got = run_distributed(run_tp, 2, 2, True, over, timeout=90)[0]
    assert any("q_layernorm" in name for name in ref["weights"])
    assert any("experts" in name for name in ref["weights"] if ".1." in name)
    assert not any("experts" in name for name in ref["weights"] if ".0." in name)
    _compare(ref, got)
