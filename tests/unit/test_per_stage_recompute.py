"""Per-stage recompute: the planner recomputes only the layers each stage needs to fit (early stages
hold more micro-batches in flight), plans carry the counts, and the runtime builds exactly those units."""
import pytest
import torch

from megahet.config import build_config
from megahet.errors import MegahetError
from megahet.hetero import cost_model as cm
from megahet.hetero.plan import Plan
from megahet.hetero.plan_setup import apply_plan_to_config
from megahet.hetero.planner import Constraints, Settings, per_stage_recompute, search
from megahet.hetero.predict import Options, predict
from megahet.parallel.pipeline import recompute_units
from tests.unit.test_planner import _group, _spec

SPEC = dict(num_layers=16, hidden=4096, ffn=16384, heads=32, query_groups=32, kv_channels=128, seq=2048)


def _plan(p=4, m=8):
    return {"layers": [16 // p] * p, "virtual_stages": 1, "expert_parallel": 1,
            "pipelines": [{"micro_batch_size": 1, "micro_batches": m,
                           "stages": [{"group": "g", "tensor_parallel": 4} for _ in range(p)]}]}


def test_block_counts_interpolate_between_no_and_full_recompute():
    spec, groups = _spec(**SPEC), {"g": _group(devices=16, memory=1000.0)}
    full, none = Options(recompute="full"), Options(recompute=None)
    base = predict(_plan(), spec, groups, cm.Links(), none)
    every = predict(_plan(), spec, groups, cm.Links(), full)
    zero = predict({**_plan(), "recompute_layers": [0] * 4}, spec, groups, cm.Links(), full)
    all4 = predict({**_plan(), "recompute_layers": [4] * 4}, spec, groups, cm.Links(), full)
    assert zero.step_time_s == pytest.approx(base.step_time_s)
    assert all4.step_time_s == pytest.approx(every.step_time_s)
    for a, b in zip(zero.stages, base.stages):
        assert a.memory.total == pytest.approx(b.memory.total)
    for a, b in zip(all4.stages, every.stages):
        assert a.memory.total == pytest.approx(b.memory.total)
    mixed = predict({**_plan(), "recompute_layers": [2, 0, 0, 0]}, spec, groups, cm.Links(), full)
    s0 = mixed.stages[0]
    assert every.stages[0].memory.total < s0.memory.total < base.stages[0].memory.total
    assert s0.bwd_s == pytest.approx((base.stages[0].bwd_s + every.stages[0].bwd_s) / 2)  # 2 of 4 layers
    assert mixed.stages[3].memory.total == pytest.approx(base.stages[3].memory.total)
    with pytest.raises(MegahetError, match="recompute_layers"):
        predict({**_plan(), "recompute_layers": [1, 1]}, spec, groups, cm.Links(), full)


def test_counts_fall_along_the_pipeline_and_fit_memory():
    spec = _spec(**SPEC)
    roomy = {"g": _group(devices=16, memory=1000.0)}
    none = predict(_plan(), spec, roomy, cm.Links(), Options())
    # Between the last stage's and the first stage's need without recompute: only early stages recompute.
    cap = (none.stages[0].memory.total + none.stages[3].memory.total) / 2 / cm.GB
    groups = {"g": _group(devices=16, memory=cap)}
    plan, pred = per_stage_recompute(_plan(), spec, groups, cm.Links(), Options(recompute="full"))
    blocks = plan["recompute_layers"]
    assert blocks[0] > 0 and blocks[-1] == 0 and blocks == sorted(blocks, reverse=True)
    assert pred.feasible and all(s.memory.total <= cap * cm.GB for s in pred.stages)
    every = predict(_plan(), spec, groups, cm.Links(), Options(recompute="full"))
    assert pred.step_time_s < every.step_time_s
    # One layer fewer on any recomputing stage does not fit: the counts are the fewest.
    for k, b in enumerate(blocks):
        if b:
            fewer = blocks[:k] + [b - 1] + blocks[k + 1:]
            assert not predict({**plan, "recompute_layers": fewer}, spec, groups, cm.Links(),
                               Options(recompute="full")).feasible


def test_search_uses_per_stage_recompute_when_it_is_faster():
    spec = _spec(**SPEC)
    none = predict(_plan(), spec, {"g": _group(devices=16, memory=1000.0)}, cm.Links(), Options())
    cap = (none.stages[0].memory.total + none.stages[3].memory.total) / 2 / cm.GB
    groups = {"g": _group(devices=16, memory=cap)}
    fixed = Constraints(tp=4, pp=4, micro_batch_size=1, recompute="full", virtual_stages=1)
    res = search(spec, groups, cm.Links(), 8, fixed)
    plain = search(spec, groups, cm.Links(), 8, fixed, Settings(per_stage_recompute=False))
    assert res.plan["recompute_layers"][0] > res.plan["recompute_layers"][-1]
    assert res.prediction.feasible and res.prediction.step_time_s < plain.prediction.step_time_s
    Plan.from_dict(res.plan)  # a plan file training accepts


def test_plan_files_carry_the_counts_and_the_runtime_builds_those_units():
    plan = Plan.from_dict({**_plan(2), "recompute_layers": [3, 0]})
    assert Plan.from_yaml(plan.to_yaml()).recompute_layers == [3, 0]
    with pytest.raises(MegahetError, match="one count per stage"):
        Plan.from_dict({**_plan(2), "recompute_layers": [1]})
    cfg = build_config(overrides=dict(num_layers=16, hidden_size=64, num_attention_heads=4, seq_length=32,
                                      global_batch_size=8, mock_data=True, train_iters=1), validate=False)
    apply_plan_to_config(cfg, plan)
    assert (cfg.train.recompute_granularity, cfg.train.recompute_method) == ("full", "block")
    assert recompute_units(cfg, [range(0, 4), range(8, 12)], block=3) == [[0], [1], [2], [8], [9], [10]]
    assert recompute_units(cfg, [range(8, 16)], block=0) == []


def test_recomputed_block_gives_the_same_gradients():
    from megahet.parallel.context import single_process_context
    from megahet.training.model_builder import build_model_chunks
    cfg = build_config(overrides=dict(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16,
                                      vocab_size=64, global_batch_size=2, micro_batch_size=2, mock_data=True,
                                      train_iters=1), validate=False)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))  # [b, s]
    grads = []
    for blocks in (None, [2]):
        ctx = single_process_context()
        if blocks is not None:
            ctx.plan = Plan.from_dict({"layers": [3], "recompute_layers": blocks, "pipelines": [
                {"micro_batch_size": 2, "micro_batches": 1, "stages": [{"group": "g"}]}]})
            apply_plan_to_config(cfg, ctx.plan)
        (model,) = build_model_chunks(cfg, ctx, 64, 64)
        assert sorted(model.recompute_units) == ([] if blocks is None else [0, 1])
        loss = model(ids, labels=ids).float().sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0)
