"""MoELayer on one process: grouped experts equal a per-token loop over experts, forward and backward;
capacity dropping, shared expert, parameter attributes, tracker statistics and recomputation."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megahet.config import build_config
from megahet.moe import MoETracker
from megahet.moe.layer import MoELayer
from megahet.moe.router import capacity_keep_mask, expert_capacity
from megahet.parallel.context import single_process_context

H, FFN, E, S, B = 16, 8, 4, 6, 2


def _cfg(**over):
    base = dict(num_layers=2, hidden_size=H, num_attention_heads=2, seq_length=S, vocab_size=32,
                tokenizer_type="NullTokenizer", mock_data=True, train_iters=1, num_experts=E,
                moe_ffn_hidden_size=FFN, moe_router_topk=2)
    base.update(over)
    return build_config(overrides=base).model


def _layer(tracker=None, dtype=torch.float32, **over):
    cfg = _cfg(**over)
    return MoELayer(cfg, single_process_context(), "decoder.layers.0.mlp", 0, 1234, False, dtype, None, tracker)


def _hidden(seed=0, dtype=torch.float32):
    return torch.randn(S, B, H, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


def _loop_reference(layer, hidden, keep=None):
    """Per token, per chosen expert: silu(x W_gate) * (x W_up) W_2, weighted; plus the shared expert."""
    x = hidden.reshape(-1, H)
    out = layer.router(x)
    w1, w2 = layer.experts.linear_fc1.weight, layer.experts.linear_fc2.weight
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(H)
        for j in range(out.indices.shape[1]):
            if keep is not None and not keep[t, j]:
                continue
            e = int(out.indices[t, j])
            gate, up = (x[t] @ w1[e]).chunk(2)
            acc = acc + out.weights[t, j] * ((F.silu(gate) * up) @ w2[e])
        rows.append(acc)
    y = torch.stack(rows).view(S, B, H)
    if layer.shared_experts is not None:
        y = y + layer.shared_experts(hidden)
    return y


def _grads(layer, hidden, y, upstream):
    params = [hidden] + list(layer.parameters())
    return torch.autograd.grad((y * upstream).sum(), params)


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
@pytest.mark.parametrize("shared", [None, 12])
def test_grouped_experts_equal_a_loop_over_experts(dispatcher, shared):
    layer = _layer(moe_token_dispatcher_type=dispatcher, moe_shared_expert_intermediate_size=shared)
    hidden = _hidden()
    upstream = torch.randn(S, B, H)
    y = layer(hidden)
    ref = _loop_reference(layer, hidden)
    assert y.shape == (S, B, H)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    for got, want in zip(_grads(layer, hidden, y, upstream), _grads(layer, hidden, ref, upstream)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert layer.router.weight.grad is None  # autograd.grad leaves .grad alone
    assert all(g.abs().sum() > 0 for g in _grads(layer, hidden, layer(hidden), upstream))


def test_capacity_drops_contribute_zero():
    layer = _layer(moe_expert_capacity_factor=0.5)
    hidden = _hidden(seed=1)
    out = layer.router(hidden.reshape(-1, H))
    cap = expert_capacity(S * B, 2, E, 0.5)
    keep = capacity_keep_mask(out.weights, out.indices, E, cap)
    assert (~keep).any()
    torch.testing.assert_close(layer(hidden), _loop_reference(layer, hidden, keep), atol=1e-6, rtol=1e-5)


def test_expert_parameters_carry_sharding_attributes():
    layer = _layer(moe_shared_expert_intermediate_size=8)
    names = dict(layer.named_parameters())
    fc1, fc2 = names["experts.linear_fc1.weight"], names["experts.linear_fc2.weight"]
    assert fc1.shape == (E, H, 2 * FFN) and fc2.shape == (E, FFN, H)
    assert (fc1.tp_dim, fc1.tp_chunks, fc2.tp_dim, fc2.tp_chunks) == (2, 2, 1, 1)
    assert fc1.is_expert and fc2.is_expert and fc1.ep_dim == 0 and fc2.ep_dim == 0
    router = names["router.weight"]
    assert router.shape == (E, H) and router.dtype == torch.float32 and not getattr(router, "is_expert", False)
    assert not getattr(names["shared_experts.linear_fc1.weight"], "is_expert", False)
    # fc2 is scaled like the dense MLP's output projection.
    assert float(fc2.detach().std()) < float(fc1.detach().std())


def test_bf16_layer_keeps_fp32_router():
    layer = _layer(dtype=torch.bfloat16)
    y = layer(_hidden(dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and layer.router.weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.router.weight.grad is not None and layer.experts.linear_fc1.weight.grad.dtype == torch.bfloat16


def test_aux_loss_gradient_reaches_the_router_with_the_tracker_scale():
    tracker = MoETracker(2, [0], E)
    tracker.aux_loss_scale = 0.25
    layer = _layer(tracker, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    hidden = _hidden(seed=2)
    layer(hidden).sum().backward()
    got = layer.router.weight.grad.clone()
    layer.zero_grad()
    free = _layer(None)  # same weights (same seed and names), no aux losses
    y = free(hidden)
    logits = free.router(hidden.reshape(-1, H)).logits
    probs = torch.softmax(logits, -1)
    counts = torch.bincount(free.router(hidden.reshape(-1, H)).indices.reshape(-1), minlength=E).double()
    aux = E * ((counts / (S * B * 2)) * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    (y.sum() + 0.25 * (0.1 * aux + 0.01 * z)).backward()
    torch.testing.assert_close(got, free.router.weight.grad, atol=1e-6, rtol=1e-5)


def test_tracker_counts_each_token_once_and_reports():
    tracker = MoETracker(3, [0, 2], E)
    layer = _layer(tracker, moe_router_enable_expert_bias=True)
    ctx = single_process_context()
    hidden = _hidden(seed=3)
    with torch.no_grad():
        layer(hidden)  # evaluation: not recorded
    checkpoint(layer, hidden, use_reentrant=False).sum().backward()  # recomputed in backward: once
    report = tracker.report(ctx)
    counts = report["moe/layer_0/tokens_per_expert"]
    assert sum(counts) == S * B * 2 and report["moe/layer_2/tokens_per_expert"] == [0] * E
    assert report["moe/layer_0/load_imbalance"] == pytest.approx(max(counts) / (sum(counts) / E))
    assert report["moe/layer_0/aux_loss"] > 0 and report["moe_aux_loss"] == pytest.approx(
        report["moe/layer_0/aux_loss"] / 2)
    assert torch.equal(layer.router.local_tokens_per_expert, torch.tensor(counts, dtype=torch.float32))
    tracker.update_expert_bias(ctx)
    mean = sum(counts) / E
    expected = torch.tensor([1e-3 * ((mean > c) - (mean < c)) for c in counts])
    torch.testing.assert_close(layer.router.expert_bias, expected)
    assert layer.router.local_tokens_per_expert.sum() == 0
    tracker.reset()
    assert tracker.report(ctx)["moe/layer_0/tokens_per_expert"] == [0] * E


def test_profile_flag_times_dispatch_and_combine():
    layer = _layer()
    layer.profile = True
    layer(_hidden(seed=4)).sum().backward()
    seconds = layer.stopwatch.seconds
    assert {"dispatch", "combine", "dispatch_backward", "combine_backward"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values())
