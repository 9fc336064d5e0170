"""Planner: cost-model pieces on hand-computed cases, the simulator against the schedule's own
simulation, memory exactness against the real model, search against brute force, memory limits and
the one-line infeasibility error."""
import itertools
import math

import pytest

from megahet.errors import MegahetError
from megahet.hetero import cost_model as cm
from megahet.hetero.memory_check import compare_cases
from megahet.hetero.planner import (Candidate, Constraints, Settings, _apportion, _balance, _Costs, _partition_exact,
                                    finer_split, search)
from megahet.hetero.predict import Options, predict
from megahet.hetero.simulate import inflight_peak, pipeline_schedule, simulate_pipeline
from megahet.parallel.schedules import build_schedule, simulate_schedule


def _spec(**kw):
    base = dict(num_layers=8, hidden=1024, ffn=4096, heads=16, query_groups=16, kv_channels=64, seq=1024,
                vocab=32000, swiglu=False, param_bytes=2, sequence_parallel=True)
    base.update(kw)
    return cm.ModelSpec(**base)


def _group(name="g", devices=8, tflops=100.0, memory=80.0, per_node=8, site="s", domain="cuda", **kw):
    return cm.GroupSpec(name=name, backend="cuda", devices=devices, devices_per_node=per_node, peak_tflops=tflops,
                        memory_gb=memory, domain=domain, site=site, efficiency=0.5, memory_bandwidth=2e12, **kw)


# -- cost-model pieces --------------------------------------------------------------------------------
def test_ring_collectives_hand_computed():
    # 4 ranks, 1 GB at 1 GB/s: all-reduce moves 2 x 3/4 GB, reduce-scatter 3/4 GB; latency per step.
    assert cm.ring_allreduce_time(1e9, 4, 1e9, 0.0) == pytest.approx(1.5)
    assert cm.ring_half_time(1e9, 4, 1e9, 0.001) == pytest.approx(0.75 + 0.003)
    assert cm.ring_allreduce_time(1e9, 1, 1e9, 1.0) == 0.0


def test_hierarchical_reduction_crosses_sites_with_shards_only():
    links = cm.Links.from_cluster({"inter_node": 10, "cross_site": 1, "cross_site_latency_ms": 0})
    links.latency = {k: 0.0 for k in links.latency}
    a, b = _group("a", site="x"), _group("b", site="y")
    one_site = cm.dp_reduce_time(4e9, [a], [4], links, 1, False, 2)
    # 4 ranks on 8-device nodes: intra-node reduce-scatter + all-gather at 100 GB/s default.
    assert one_site == pytest.approx(2 * 0.75 * 4e9 / 100e9)
    two = cm.dp_reduce_time(4e9, [a, b], [4, 4], links, 1, False, 2)
    # plus a 2-site all-reduce of one quarter shard (1 GB) at 1 GB/s: 2 x 1/2 x 1 GB = 1 s.
    assert two == pytest.approx(one_site + 1.0)


def test_state_bytes_sharded_by_distributed_optimizer():
    spec = _spec()
    count = cm.ParamCount(dense=1000, expert=800, fp32=40)
    full = cm.state_bytes(spec, count, dp=4, expert_dp=2, distributed_optimizer=False)
    assert full.params == 1800 * 2 + 40 * 4
    assert full.grads == 1840 * 4
    assert full.optimizer == 1800 * 12 + 40 * 8  # bf16: fp32 master + 2 moments; fp32 router: moments only
    shard = cm.state_bytes(spec, count, dp=4, expert_dp=2, distributed_optimizer=True)
    assert shard.optimizer == (1000 // 4 + 800 // 2) * 12 + 40 // 4 * 8
    fp32 = cm.state_bytes(_spec(param_bytes=4), count, dp=1, expert_dp=1, distributed_optimizer=False)
    assert fp32.optimizer == 1840 * 8  # fp32 params are their own masters


def test_activation_bytes_hand_computed():
    spec = _spec(hidden=8, ffn=16, heads=2, query_groups=2, kv_channels=4, param_bytes=2, swiglu=False)
    # tp 1: attn 2*(2h + (qkv 24 + out 8)) + 4*heads = 2*(16+32) + 8 = 104; mlp 2*(2h + 2*ffn) = 2*48 = 96.
    assert cm.activation_bytes_per_token(spec, False, 1, None) == pytest.approx(200)
    assert cm.activation_bytes_per_token(spec, False, 1, "full") == pytest.approx(16)
    assert cm.activation_bytes_per_token(spec, False, 1, "selective") == pytest.approx(200 - 16)


def test_flop_based_compute_time():
    spec = _spec()
    g = _group(tflops=100.0)
    t = cm.compute_time(g, spec, "dense", 2, 1)
    tokens = 2 * spec.seq
    expect = (cm.layer_flops(spec, False) * tokens / (100e12 * 0.5)
              + tokens * cm.elementwise_bytes_per_token(spec, 1) / 2e12)
    assert t.fwd == pytest.approx(expect)
    assert t.bwd == pytest.approx(2 * expect)


def test_parameter_counts_match_the_real_model_on_meta():
    for case, rank, real, predicted in compare_cases():
        assert real == predicted, f"{case} {rank}"


def test_state_bytes_match_a_real_rank(tmp_path):
    from megahet.config import build_config
    from megahet.parallel.context import single_process_context
    from megahet.training.model_builder import build_model_chunks
    from megahet.training.optimizer_setup import build_optimizer
    cfg = build_config(overrides=dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                                      vocab_size=300, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                                      bf16=True, mock_data=True, train_iters=1))
    ctx = single_process_context("cpu")
    chunks = build_model_chunks(cfg, ctx, 300, 384)
    ddp, opt = build_optimizer(cfg, ctx, chunks, None)
    spec = cm.ModelSpec.from_config(cfg, 300)
    predicted = cm.state_bytes(spec, cm.stage_params(spec, range(2), 1, 1, True, True, 1), 1, 1, False)
    params = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    grads = sum(b.data.numel() * 4 for b in ddp.buffers)
    copies = sum(pc.master.numel() * 4 for pc in opt.pieces if not pc.aliased)  # fp32 params alias theirs
    moments = sum(pc.master.numel() * 8 for pc in opt.pieces)  # AdamW's two fp32 moments per element
    assert params == predicted.params
    assert grads == predicted.grads
    assert copies + moments == predicted.optimizer


# -- simulator ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pp,m,v", [(1, 3, 1), (2, 4, 1), (4, 8, 1), (4, 2, 1), (2, 4, 2), (4, 8, 2)])
def test_simulator_matches_schedule_simulation_with_unit_times(pp, m, v):
    actions = pipeline_schedule(pp, m, v)
    ref = simulate_schedule(actions, fwd_time=1.0, bwd_time=2.0)
    res = simulate_pipeline(actions, lambda r, c, mb: 1.0, lambda r, c, mb: 2.0)
    assert res.time == pytest.approx(max(end for row in ref for _, _, end in row))


def test_simulator_1f1b_closed_form_and_link_delay():
    p, m, f, b, d = 4, 8, 1.0, 2.0, 0.25
    actions = build_schedule("1f1b", p, m)
    res = simulate_pipeline(actions, lambda *a: f, lambda *a: b)
    assert res.time == pytest.approx((m + p - 1) * (f + b))
    # Two stages, m = 2, by hand: F0 0-1 | (+d) F0 1.25-2.25, B0 -4.25 | F1 -5.25, B1 -7.25 | (+d) B1 7.5-9.5.
    two = simulate_pipeline(build_schedule("1f1b", 2, 2), lambda *a: f, lambda *a: b, lambda s, t, direction: d)
    assert two.time == pytest.approx(9.5)
    # Deeper 1F1B pays the delay on every steady-state round trip, so at least the fill/drain crossings.
    delayed = simulate_pipeline(actions, lambda *a: f, lambda *a: b, lambda s, t, direction: d)
    assert delayed.time >= (m + p - 1) * (f + b) + 2 * (p - 1) * d


def test_uneven_stage_is_the_bottleneck():
    actions = build_schedule("1f1b", 2, 6)
    res = simulate_pipeline(actions, lambda r, c, mb: (1.0, 2.0)[r], lambda r, c, mb: (2.0, 4.0)[r])
    assert res.time == pytest.approx(3.0 + 6 * 6.0)  # stage 0 fill + 6 micro-batches of the slow stage


def test_inflight_from_the_schedule():
    actions = build_schedule("1f1b", 4, 8)
    assert [inflight_peak(a, [1.0]) for a in actions] == [4, 3, 2, 1]
    afab = build_schedule("afab", 2, 5)
    assert inflight_peak(afab[0], [1.0]) == 5


# -- search ----------------------------------------------------------------------------------------------
def test_balance_and_exact_partition():
    assert _balance([1.0, 2.0], [0.0, 0.0], 12) == [8, 4]
    times = [1.0, 1.0, 2.0]
    exact = _partition_exact(lambda j, a, b: (b - a) * times[j], 3, 10)
    splits = [[a, b, 10 - a - b] for a in range(1, 9) for b in range(1, 10 - a) if 10 - a - b >= 1]
    best = min(max(n * t for n, t in zip(split, times)) for split in splits)
    assert max(n * t for n, t in zip(exact, times)) == best


def test_apportion_sums_exactly_and_feeds_every_pipeline():
    counts = _apportion(17, [(2, 1.0, 0.0), (1, 2.0, 0.0)])
    assert sum(map(sum, counts)) == 17 and min(min(c) for c in counts) >= 1
    assert counts[0] == [7, 7] and counts[1] == [3]  # finish times 7, 7, 6: no move improves
    with pytest.raises(MegahetError):
        _apportion(2, [(3, 1.0, 0.0)])


def _brute_force(spec, groups, links, gbs, options):
    """Every runnable plan of a 2-group, 1-device-each cluster: both layouts, all splits, sizes, counts."""
    best = math.inf
    names = list(groups)
    sizes = (1, 2, 4)
    for s0 in range(1, gbs):  # split: one pipeline per group, each its own micro-batch size
        for b0, b1 in itertools.product(sizes, sizes):
            if s0 % b0 or (gbs - s0) % b1:
                continue
            plan = {"layers": [spec.num_layers], "virtual_stages": 1, "expert_parallel": 1, "pipelines": [
                {"micro_batch_size": b0, "micro_batches": s0 // b0, "stages": [{"group": names[0], "tensor_parallel": 1}]},
                {"micro_batch_size": b1, "micro_batches": (gbs - s0) // b1,
                 "stages": [{"group": names[1], "tensor_parallel": 1}]}]}
            best = min(best, predict(plan, spec, groups, links, options).step_time_s)
    for mbs in sizes:
        if gbs % mbs:
            continue
        units = gbs // mbs
        for order in (names, names[::-1]):  # mixed: a 2-stage pipeline, every layer split
            for a in range(1, spec.num_layers):
                plan = {"layers": [a, spec.num_layers - a], "virtual_stages": 1, "expert_parallel": 1,
                        "pipelines": [{"micro_batch_size": mbs, "micro_batches": units,
                                       "stages": [{"group": g, "tensor_parallel": 1} for g in order]}]}
                best = min(best, predict(plan, spec, groups, links, options).step_time_s)
    return best


@pytest.mark.parametrize("speed,gbs", [(0.5, 8), (0.25, 12), (0.9, 4)])
def test_search_matches_brute_force_on_small_cases(speed, gbs):
    spec = _spec(num_layers=6, hidden=512, ffn=2048, heads=8, query_groups=8, vocab=8000, seq=512)
    groups = {"fast": _group("fast", devices=1, tflops=10.0, domain="a"),
              "slow": _group("slow", devices=1, tflops=10.0 * speed, domain="b")}
    links = cm.Links()
    res = search(spec, groups, links, gbs, Constraints(recompute=None), Settings(max_virtual_stages=1))
    brute = _brute_force(spec, groups, links, gbs, Options())
    assert res.prediction.step_time_s == pytest.approx(brute, rel=0.02)
    assert res.prediction.step_time_s >= brute * (1 - 1e-9)


def test_memory_limits_are_respected_and_force_more_sharding():
    spec = _spec(num_layers=16, hidden=4096, ffn=16384, heads=32, query_groups=32, kv_channels=128, seq=2048)
    roomy = search(spec, {"g": _group(devices=16, memory=400.0)}, cm.Links(), 64)
    tight = search(spec, {"g": _group(devices=16, memory=24.0)}, cm.Links(), 64)
    for res, limit in ((roomy, 400.0), (tight, 24.0)):
        assert res.prediction.feasible
        assert res.prediction.groups["g"]["memory_gb"] <= limit
        assert all(s.memory.total <= limit * cm.GB for s in res.prediction.stages)
    shard = lambda r: max(s.tp for s in r.prediction.stages) * len(r.plan["layers"])  # noqa: E731
    assert shard(tight) > shard(roomy) or tight.options.recompute


def test_infeasible_cluster_names_the_group_lacking_memory():
    spec = _spec(num_layers=4, hidden=8192, ffn=32768, heads=64, query_groups=64, kv_channels=128)
    groups = {"big": _group("big", devices=2, memory=1000.0, per_node=2),
              "tiny": _group("tiny", devices=2, memory=2.0, per_node=2, domain="other")}
    with pytest.raises(MegahetError) as err:
        search(spec, groups, cm.Links(), 8, Constraints(layout="mixed"))
    msg = str(err.value)
    assert "'tiny'" in msg and "memory" in msg and "\n" not in msg


def test_fixed_layout_is_honoured():
    spec = _spec(num_layers=8)
    res = search(spec, {"g": _group(devices=16)}, cm.Links(), 64,
                 Constraints(tp=2, pp=4, micro_batch_size=2, recompute=None, virtual_stages=1))
    plan = res.plan
    assert len(plan["layers"]) == 4 and len(plan["pipelines"]) == 2
    assert all(s["tensor_parallel"] == 2 for p in plan["pipelines"] for s in p["stages"])
    assert sum(p["micro_batch_size"] * p["micro_batches"] for p in plan["pipelines"]) == 64


def test_split_layout_gives_the_faster_replica_more_samples():
    spec = _spec(num_layers=4)
    groups = {"fast": _group("fast", devices=1, tflops=100.0, domain="a"),
              "slow": _group("slow", devices=1, tflops=50.0, domain="b")}
    res = search(spec, groups, cm.Links(), 30, Constraints(layout="split", micro_batch_size=1))
    samples = {p["stages"][0]["group"]: p["micro_batches"] for p in res.plan["pipelines"]}
    assert samples["fast"] + samples["slow"] == 30
    # Samples in proportion to each replica's speed per micro-batch (within one micro-batch).
    per_mb = {g: predict({"layers": [4], "pipelines": [{"micro_batch_size": 1, "micro_batches": 1, "stages": [
        {"group": g, "tensor_parallel": 1}]}]}, spec, groups, cm.Links()).pipeline_time_s for g in groups}
    share = per_mb["slow"] / (per_mb["fast"] + per_mb["slow"]) * 30
    assert abs(samples["fast"] - share) <= 1 and samples["fast"] > samples["slow"]


def _two_replicas(ratio):
    spec = _spec(num_layers=4)
    groups = {"fast": _group("fast", devices=1, tflops=100.0, domain="a"),
              "slow": _group("slow", devices=1, tflops=100.0 * ratio, domain="b")}
    return spec, groups


def test_finer_split_takes_the_batch_one_sample_at_a_time():
    spec, groups = _two_replicas(0.45)
    coarse = {"layers": [4], "virtual_stages": 1, "expert_parallel": 1, "pipelines": [
        {"micro_batch_size": 2, "micro_batches": m, "stages": [{"group": g, "tensor_parallel": 1}]}
        for g, m in (("fast", 17), ("slow", 7))]}
    cand = Candidate("split", [(("fast",), 1), (("slow",), 1)], (1,), 2, 1, None)
    costs = _Costs(spec, groups, cm.Links())
    finer = finer_split(coarse, cand, costs, 48, (1, 2, 4))
    samples = {p["stages"][0]["group"]: p["micro_batch_size"] * p["micro_batches"] for p in finer["pipelines"]}
    assert samples == {"fast": 33, "slow": 15}  # 48 / 1.45 = 33.1 on the fast replica
    assert all(p["micro_batch_size"] <= 2 for p in finer["pipelines"])
    assert finer_split(coarse, cand, costs, 48, (2,)) is None  # a fixed --micro-batch-size stays: 17 : 7 is best
    slower = lambda plan: predict(plan, spec, groups, cm.Links()).step_time_s  # noqa: E731
    assert slower(finer) < slower(coarse)
    # Nothing to gain: the same plan back as None.
    even = {**coarse, "pipelines": [{**p, "micro_batches": 12} for p in coarse["pipelines"]]}
    assert finer_split(even, cand, _Costs(spec, _two_replicas(1.0)[1], cm.Links()), 48, (1, 2, 4)) is None


def test_large_cluster_plans_use_every_device():
    spec = _spec(num_layers=24, hidden=2048, ffn=8192, heads=16, query_groups=16, kv_channels=128)
    groups = {"a": _group("a", devices=512, tflops=300.0), "b": _group("b", devices=256, tflops=150.0,
                                                                        domain="npu")}
    res = search(spec, groups, cm.Links(), 1024)
    used = sum(s["tensor_parallel"] for p in res.plan["pipelines"] for s in p["stages"])
    assert used == 768
    assert sum(p["micro_batch_size"] * p["micro_batches"] for p in res.plan["pipelines"]) == 1024


def test_brute_force_helper_is_exhaustive():
    # Guard for the brute-force test itself: it must try both stage orders and every layer split.
    spec = _spec(num_layers=3)
    seen = set()
    for order, a in itertools.product((0, 1), range(1, spec.num_layers)):
        seen.add((order, a))
    assert len(seen) == 2 * (spec.num_layers - 1)


def test_ep_comm_counts_the_dispatchers_five_collectives():
    # 2 MoE layers, EP 4 in one node, 1 GB/s, 1 ms: per layer 4 all-to-alls of tokens x topk x h x 2 bytes,
    # each (3/4 x bytes / bw + 3 x lat), plus the all-gather of 8 int64 counts (3 x lat + 3 x 64 / bw).
    spec = _spec(num_experts=8, topk=2, sequence_parallel=False)
    links = cm.Links()
    links.bandwidth["intra_node"], links.latency["intra_node"] = 1e9, 1e-3
    nbytes = 2 * 1024 * 2 * 1024 * 2  # mbs 2 x seq 1024 tokens, top-2, hidden 1024, bf16
    per_layer = 4 * (0.75 * nbytes / 1e9 + 3e-3) + (3e-3 + 3 * 64 / 1e9)
    got = cm.ep_comm_time(spec, _group(), links, mbs=2, tp=1, ep=4, moe_layers=2)
    assert got == pytest.approx(2 * per_layer)
    assert cm.ep_comm_time(spec, _group(), links, mbs=2, tp=1, ep=1, moe_layers=2) == 0.0
