"""Router math (top-k, scores, groups, bias, scaling, capacity) and aux losses against plain references."""
import math

from megahet.errors import MegahetError

import pytest
import torch

from megahet.moe.aux_loss import attach_aux_loss, load_balancing_loss, z_loss
from megahet.moe.router import (capacity_keep_mask, expert_capacity, route, scores_for_aux_loss,
                                updated_expert_bias)

N, E = 24, 8


def _logits(seed=0, n=N, e=E, dtype=torch.float32):
    return torch.randn(n, e, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2


def _reference_route(logits, topk, score_function, pre_softmax, num_groups, group_topk, scaling, bias):
    """One token at a time, with Python sorting: the specification of `route`."""
    weights, indices = [], []
    for row in logits.double():
        if score_function == "softmax":
            scores = [math.exp(v) for v in row.tolist()]
            total = sum(scores)
            scores = [s / total for s in scores]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row.tolist()]
        select = [s + (float(bias[i]) if bias is not None else 0.0) for i, s in enumerate(scores)]
        allowed = list(range(len(scores)))
        if num_groups:
            size = len(scores) // num_groups
            per_group = max(1, topk // group_topk)
            group_score = [sum(sorted(select[g * size:(g + 1) * size], reverse=True)[:per_group])
                           for g in range(num_groups)]
            best = sorted(range(num_groups), key=lambda g: -group_score[g])[:group_topk]
            allowed = [i for g in best for i in range(g * size, (g + 1) * size)]
        chosen = sorted(allowed, key=lambda i: -select[i])[:topk]
        w = [scores[i] for i in chosen]
        if (score_function == "sigmoid" and topk > 1) or (score_function == "softmax" and not pre_softmax):
            w = [v / sum(w) for v in w]
        if scaling:
            w = [v * scaling for v in w]
        weights.append(w)
        indices.append(chosen)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(indices)


CASES = {
    "mixtral": dict(topk=2, score_function="softmax", pre_softmax=False),
    "pre_softmax": dict(topk=2, score_function="softmax", pre_softmax=True),
    "sigmoid": dict(topk=3, score_function="sigmoid", pre_softmax=False),
    "sigmoid_top1": dict(topk=1, score_function="sigmoid", pre_softmax=False),
    "groups_sigmoid_bias_scaled": dict(topk=4, score_function="sigmoid", pre_softmax=False, num_groups=4,
                                       group_topk=2, scaling=2.5, bias=True),
    "groups_softmax": dict(topk=2, score_function="softmax", pre_softmax=True, num_groups=2, group_topk=1),
    "softmax_bias_scaled": dict(topk=2, score_function="softmax", pre_softmax=False, scaling=1.5, bias=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_route_matches_per_token_reference(name):
    case = {**dict(num_groups=None, group_topk=None, scaling=None, bias=False), **CASES[name]}
    logits = _logits(seed=len(name))
    bias = torch.linspace(-0.3, 0.3, E) if case.pop("bias") else None
    ref_w, ref_i = _reference_route(logits, bias=bias, **case)
    w, i = route(logits, case["topk"], case["score_function"], case["pre_softmax"], case["num_groups"],
                 case["group_topk"], case["scaling"], bias)
    assert w.dtype == torch.float32 and i.dtype == torch.int64
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-6)


def test_group_limited_routing_stays_inside_the_chosen_groups():
    logits = _logits(seed=3, n=64, e=16)
    _, idx = route(logits, 4, "sigmoid", num_groups=8, group_topk=2)
    groups_used = (idx // 2).sort(dim=-1).values  # 8 groups of 2 experts
    assert all(len(set(row.tolist())) <= 2 for row in groups_used)


def test_mixtral_routing_is_exactly_hf_mixtral():
    """HF MixtralSparseMoeBlock: softmax over all experts in fp32, top-k, divide by the top-k sum."""
    logits = _logits(seed=5, n=64)
    routing_weights = torch.softmax(logits, dim=1, dtype=torch.float)
    hf_w, hf_i = torch.topk(routing_weights, 2, dim=-1)
    hf_w /= hf_w.sum(dim=-1, keepdim=True)
    w, i = route(logits, 2, "softmax", pre_softmax=False)
    assert torch.equal(i, hf_i)
    assert torch.equal(w, hf_w)  # bit-exact, so a converted checkpoint routes identically


def test_expert_bias_steers_selection_but_not_weights():
    logits = torch.zeros(4, 4)
    logits[:, 0] = 1.0  # expert 0 is everyone's favourite
    bias = torch.tensor([-10.0, 0.0, 0.0, 10.0])
    w, i = route(logits, 1, "sigmoid", expert_bias=bias)
    assert (i == 3).all()
    torch.testing.assert_close(w, torch.full((4, 1), 0.5))  # sigmoid(0) of the chosen expert, no bias


def test_expert_bias_update_is_a_sign_step_towards_the_mean_load():
    bias = torch.zeros(4)
    new = updated_expert_bias(bias, torch.tensor([10.0, 2.0, 6.0, 6.0]), rate=0.01)
    torch.testing.assert_close(new, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_capacity_drops_the_lowest_probability_assignments(factor):
    logits = _logits(seed=11, n=40)
    logits[:, 0] += 3.0  # overload expert 0
    w, idx = route(logits, 2, "softmax")
    cap = expert_capacity(40, 2, E, factor)
    assert cap == math.ceil(40 * 2 / E * factor)
    keep = capacity_keep_mask(w, idx, E, cap)
    for e in range(E):
        assigned = idx == e
        kept, dropped = w[assigned & keep], w[assigned & ~keep]
        assert kept.numel() == min(int(assigned.sum()), cap)
        if dropped.numel():
            assert kept.min() >= dropped.max()
    assert (~keep).any()  # expert 0 overflowed


def test_aux_loss_value_and_balanced_value():
    logits = _logits(seed=2, dtype=torch.float64)
    scores = scores_for_aux_loss(logits, "softmax")
    _, idx = route(logits, 2, "softmax")
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    f = counts.double() / (N * 2)
    p = scores.double().mean(dim=0)
    torch.testing.assert_close(load_balancing_loss(scores, counts, N, 2).double(), E * (f * p).sum())
    uniform = torch.full((N, E), 1.0 / E)
    assert float(load_balancing_loss(uniform, torch.full((E,), N * 2 // E), N, 2)) == pytest.approx(1.0)


def test_sigmoid_aux_scores_are_normalised():
    scores = scores_for_aux_loss(_logits(seed=4), "sigmoid")
    torch.testing.assert_close(scores.sum(-1), torch.ones(N))


def test_shard_losses_sum_to_the_full_loss():
    """Sequence parallelism: each TP rank computes its shard's part with the TP-wide counts."""
    logits = _logits(seed=9, dtype=torch.float64)
    scores = scores_for_aux_loss(logits, "softmax")
    counts = torch.bincount(route(logits, 2, "softmax")[1].reshape(-1), minlength=E)
    full = load_balancing_loss(scores, counts, N, 2)
    parts = sum(load_balancing_loss(s, counts, N, 2) for s in scores.chunk(3))
    torch.testing.assert_close(parts, full)
    torch.testing.assert_close(sum(z_loss(c, N) for c in logits.chunk(3)), z_loss(logits, N))


def test_aux_losses_gradcheck():
    logits = _logits(seed=6, n=6, e=4, dtype=torch.float64).requires_grad_()
    counts = torch.tensor([3, 4, 2, 3])
    assert torch.autograd.gradcheck(lambda l: load_balancing_loss(torch.softmax(l, -1), counts, 6, 2), (logits,))
    assert torch.autograd.gradcheck(lambda l: z_loss(l, 6), (logits,))
    expected = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(z_loss(logits, 6), expected)


def test_attach_aux_loss_adds_scaled_aux_gradient():
    logits = _logits(seed=8, n=5, e=4, dtype=torch.float64).requires_grad_()
    upstream = torch.randn(5, 4, dtype=torch.float64)
    scale = 0.375

    def main_loss(x):
        return (x * upstream).sum()

    probs = torch.softmax(logits, -1)
    aux = z_loss(logits, 5) * 0.1
    main_loss(attach_aux_loss(probs, aux, scale)).backward()
    got = logits.grad.clone()
    logits.grad = None
    probs = torch.softmax(logits, -1)
    (main_loss(probs) + scale * z_loss(logits, 5) * 0.1).backward()
    torch.testing.assert_close(got, logits.grad)
    out = attach_aux_loss(probs.detach(), aux.detach(), scale)
    assert torch.equal(out, probs.detach())  # forward is the identity


def test_sigmoid_pre_softmax_keeps_scores_unnormalised():
    from megahet.moe.router import route
    logits = torch.randn(6, 8)
    weights, indices = route(logits, 3, "sigmoid", pre_softmax=True)
    torch.testing.assert_close(weights, torch.sigmoid(logits).gather(1, indices))
    normalised, _ = route(logits, 3, "sigmoid")
    torch.testing.assert_close(normalised.sum(-1), torch.ones(6))


def test_group_topk_larger_than_a_group_is_a_config_error():
    from megahet.config import build_config
    from megahet.moe.router import group_limited_topk
    with pytest.raises(MegahetError, match="topk // group_topk"):
        group_limited_topk(torch.randn(4, 8), 6, 4, 2)  # 6 // 2 = 3 > 2 experts per group
    with pytest.raises(MegahetError, match="--moe-router-topk 6 with --moe-router-group-topk 2"):
        build_config(dict(train_iters=1, mock_data=True, num_experts=8, moe_router_topk=6,
                          moe_router_num_groups=4, moe_router_group_topk=2))


def test_moe_layer_freq_list_forms():
    from megahet.config import build_config
    from megahet.models.transformer import is_moe_layer
    for value in ("([0]+[1]*3)", "[0,1,1,1]", [0, 1, 1, 1]):
        cfg = build_config(dict(train_iters=1, mock_data=True, num_layers=4, num_experts=4, moe_layer_freq=value))
        assert [is_moe_layer(cfg.model, i) for i in range(4)] == [False, True, True, True]
    with pytest.raises(MegahetError, match="lists 3 layers but --num-layers is 4"):
        build_config(dict(train_iters=1, mock_data=True, num_layers=4, num_experts=4, moe_layer_freq="[1,1,1]"))
    with pytest.raises(MegahetError, match="moe_layer_freq"):
        build_config(dict(train_iters=1, mock_data=True, num_layers=4, num_experts=4, moe_layer_freq="__import__('os')"))
