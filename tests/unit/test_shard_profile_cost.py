"""The cost model with TP / EP shards timed with their peers: their times (collectives included) replace
the layer's time / tp plus the link model's collectives; degrees not timed keep the derived estimate."""
import pytest

from megahet.hetero import cost_model as cm
from megahet.hetero.predict import _chunk_cost
from megahet.hetero.profile import Profile


def _spec():
    return cm.ModelSpec(num_layers=2, hidden=256, ffn=1024, heads=4, query_groups=4, kv_channels=64, seq=128,
                        vocab=2048, swiglu=False, param_bytes=4, sequence_parallel=False)


def _group(times):
    prof = Profile("cpu", "cpu", times=times, optimizer_s_per_param=1e-9, peak_tflops=1.0)
    return cm.GroupSpec(name="g", backend="cpu", devices=2, devices_per_node=2, peak_tflops=1.0, memory_gb=64.0,
                        domain="cpu", profile=prof)


BASE = {"dense/2": [0.010, 0.020], "embed/2": [0.001, 0.002], "head/2": [0.004, 0.008]}
TP2 = {"dense@tp2/2": [0.009, 0.016], "embed@tp2/2": [0.002, 0.003], "head@tp2/2": [0.003, 0.005]}


def test_measured_tp_shard_replaces_the_split_layer_and_its_collectives():
    spec, links = _spec(), cm.Links()
    derived, measured = _group(dict(BASE)), _group({**BASE, **TP2})
    assert cm.compute_time(measured, spec, "dense", 2, 2) == cm.StageTimes(0.009, 0.016)
    assert cm.compute_time(measured, spec, "head", 2, 2) == cm.StageTimes(0.003, 0.005)
    assert cm.compute_time(derived, spec, "dense", 2, 2) == cm.StageTimes(0.005, 0.010)  # time / tp
    assert cm.compute_time(measured, spec, "dense", 2, 1) == cm.StageTimes(0.010, 0.020)  # TP 1: the layer
    # Two layers, first and last stage: measured = the shard times only; derived adds the collectives.
    f, b, _ = _chunk_cost(spec, measured, links, [0, 1], True, True, 2, 2, 1, None)
    assert f == pytest.approx(2 * 0.009 + 0.002 + 0.003) and b == pytest.approx(2 * 0.016 + 0.003 + 0.005)
    f, b, _ = _chunk_cost(spec, derived, links, [0, 1], True, True, 2, 2, 1, None)
    comm = cm.tp_comm_time(spec, derived, links, 2, 2, 2)
    assert comm > 0
    assert f == pytest.approx(2 * 0.005 + 0.001 + 0.002 + comm / 2)
    assert not cm.shard_measured(derived, "dense", 2) and cm.shard_measured(measured, "dense", 2)
    assert not cm.shard_measured(measured, "dense", 4)
    assert not cm.shard_measured(measured, "dense", 1)  # nothing sharded: the plain layer


def test_shard_keys():
    assert cm.shard_key("dense", 1) == "dense" and cm.shard_key("dense", 2) == "dense@tp2"
    assert cm.shard_key("dense", 2, 4) == "dense@tp2"  # EP shards only the MoE layer
    assert cm.shard_key("moe", 1, 2) == "moe@ep2" and cm.shard_key("moe", 2, 2) == "moe@tp2ep2"
    assert cm.shard_key("moe", 4) == "moe@tp4" and cm.shard_key("head", 2, 2) == "head@tp2"


def _moe_spec():
    return cm.ModelSpec(num_layers=2, hidden=256, ffn=1024, heads=4, query_groups=4, kv_channels=64, seq=128,
                        vocab=2048, swiglu=False, param_bytes=4, sequence_parallel=False, num_experts=4, topk=2,
                        moe_ffn=256, moe_layer_freq=1)


def test_measured_ep_shard_replaces_the_layer_and_its_all_to_alls():
    spec, links = _moe_spec(), cm.Links()
    moe = {"moe/2": [0.020, 0.040], "embed/2": [0.001, 0.002], "head/2": [0.004, 0.008]}
    derived, measured = _group(dict(moe)), _group({**moe, "moe@ep2/2": [0.024, 0.050]})
    assert cm.compute_time(measured, spec, "moe", 2, 1, 2) == cm.StageTimes(0.024, 0.050)
    assert cm.compute_time(derived, spec, "moe", 2, 1, 2) == cm.StageTimes(0.020, 0.040)  # EP: same compute
    assert cm.compute_time(measured, spec, "moe", 2, 1, 4) == cm.StageTimes(0.020, 0.040)  # EP 4 not timed
    # Two MoE layers, one stage: measured = the shard times only; derived adds five collectives per layer.
    f, b, _ = _chunk_cost(spec, measured, links, [0, 1], True, True, 2, 1, 2, None)
    assert f == pytest.approx(2 * 0.024 + 0.001 + 0.004) and b == pytest.approx(2 * 0.050 + 0.002 + 0.008)
    f, b, _ = _chunk_cost(spec, derived, links, [0, 1], True, True, 2, 1, 2, None)
    comm = cm.ep_comm_time(spec, derived, links, 2, 1, 2, 2)
    assert comm > 0
    assert f == pytest.approx(2 * 0.020 + 0.001 + 0.004 + comm / 2)
    # Full recompute of a measured EP shard: the checkpoint ratios applied to the shard's own times.
    g = _group({**moe, "moe@ep2/2": [0.024, 0.050], "moe-recompute/2": [0.022, 0.066]})
    t = cm.recompute_time(g, spec, "moe", 2, 1, 2)
    assert t.fwd == pytest.approx(0.024 * 1.1) and t.fwd + t.bwd == pytest.approx((0.024 + 0.050) * 0.088 / 0.060)


def test_auto_planning_times_the_tp_and_ep_degrees_its_local_groups_allow(monkeypatch):
    from megahet.config import build_config
    from megahet.hetero import autoplan
    from megahet.hetero.cluster import parse_cluster
    cfg = build_config(overrides=dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                                      vocab_size=512, global_batch_size=4, micro_batch_size=1, mock_data=True,
                                      train_iters=1), validate=False)
    calls = []

    def fake(model_cfg, dtype, speeds, tp, ep=1, **kw):
        calls.append((list(speeds), tp, ep))
        return [{f"{cm.shard_key('dense' if ep == 1 else 'moe', tp, ep)}/1": [float(r), 1.0]}
                for r in range(len(speeds))]

    monkeypatch.setattr("megahet.hetero.profile.load_or_measure_shards_together", fake)
    four = parse_cluster({"groups": [{"name": "c", "backend": "cpu", "devices": 2},
                                     {"name": "s", "backend": "sim", "devices": 2, "speed": 0.5}]})
    ranks = autoplan.local_speeds(four)
    profiles = {"c": Profile("cpu", "c"), "s": Profile("sim", "s")}
    autoplan._add_shards(cfg, four, ranks, profiles, {})
    assert calls == [([1.0, 1.0, 0.5, 0.5], 2, 1)]  # 4 heads, groups of 2, dense: TP 2 only
    assert profiles["c"].times == {"dense@tp2/1": [0.0, 1.0]} and profiles["s"].times == {"dense@tp2/1": [2.0, 1.0]}
    calls.clear()
    two = parse_cluster({"groups": [{"name": "c", "backend": "cpu", "devices": 1},
                                    {"name": "s", "backend": "sim", "devices": 1, "speed": 0.5}]})
    autoplan._add_shards(cfg, two, autoplan.local_speeds(two), {"c": Profile("cpu", "c"), "s": Profile("sim", "s")},
                         {})
    assert calls == []  # one device per group: no TP to time
    # A MoE model with 4 experts on groups of 4 and 2: TP 2 and 4, EP 2 and 4, and TP 2 x EP 2.
    moe = build_config(overrides=dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                                      vocab_size=512, global_batch_size=4, micro_batch_size=1, mock_data=True,
                                      train_iters=1, num_experts=4, moe_router_topk=2), validate=False)
    six = parse_cluster({"groups": [{"name": "c", "backend": "cpu", "devices": 4},
                                    {"name": "s", "backend": "sim", "devices": 2, "speed": 0.5}]})
    autoplan._add_shards(moe, six, autoplan.local_speeds(six), {"c": Profile("cpu", "c"), "s": Profile("sim", "s")}, {})
    assert [(tp, ep) for _, tp, ep in calls] == [(1, 2), (1, 4), (2, 1), (2, 2), (4, 1)]


def test_full_recompute_of_a_measured_tp_shard_scales_the_shard_by_the_checkpoint_ratio():
    spec = _spec()
    # Checkpointed layer: 11 / 10 on the forward, 33 / 30 on the whole: applied to the shard's own times.
    g = _group({**BASE, **TP2, "dense-recompute/2": [0.011, 0.022]})
    t = cm.recompute_time(g, spec, "dense", 2, 2)
    assert t.fwd == pytest.approx(0.009 * 1.1)
    assert t.fwd + t.bwd == pytest.approx((0.009 + 0.016) * 1.1)
