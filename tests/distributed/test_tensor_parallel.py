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
