"""Host contention: ranks sharing a host's cores are stretched by how many compute at the same moment in
the plan's simulated timeline, from a curve measured once (hand-computed cases)."""
from dataclasses import replace

import pytest

from megahet.hetero import cost_model as cm
from megahet.hetero.cluster import parse_cluster
from megahet.hetero.host_contention import mean_slowdowns, slowdown
from megahet.hetero.planner import cluster_groups
from megahet.hetero.predict import predict
from megahet.hetero.profile import Profile


def _spec():
    return cm.ModelSpec(num_layers=2, hidden=256, ffn=1024, heads=4, query_groups=4, kv_channels=64, seq=128,
                        vocab=2048, swiglu=False, param_bytes=4, sequence_parallel=False)


def _group(**kw):
    return cm.GroupSpec(name="g", backend="cpu", devices=2, devices_per_node=2, peak_tflops=1.0, memory_gb=64.0,
                        domain="cpu", efficiency=0.5, memory_bandwidth=1e11, **kw)


def _plan(*micro_batches):
    return {"layers": [2], "pipelines": [{"micro_batch_size": 1, "micro_batches": m,
                                          "stages": [{"group": "g", "tensor_parallel": 1}]} for m in micro_batches]}


def test_slowdown_interpolates_and_extrapolates_in_proportion():
    curve = [1.0, 1.8, 2.7]
    assert slowdown(curve, 1) == 1.0 and slowdown(curve, 0) == 1.0
    assert slowdown(curve, 2) == pytest.approx(1.8)
    assert slowdown(curve, 2.5) == pytest.approx(2.25)
    assert slowdown(curve, 3) == pytest.approx(2.7)
    assert slowdown(curve, 6) == pytest.approx(5.4)  # 2.7 for 3 ranks: twice as many, twice as slow
    assert slowdown([], 4) == 1.0 and slowdown([1.0], 4) == 1.0


def test_mean_slowdown_over_each_interval():
    # [0, 2] and [1, 3] overlap for half of each: mean of s(1) = 1 and s(2) = 1.8.
    out = mean_slowdowns([("a", 0.0, 2.0, 1), ("b", 1.0, 2.0, 1)], [1.0, 1.8])
    assert out == {"a": pytest.approx(1.4), "b": pytest.approx(1.4)}
    # Two identical ranks in one interval meet each other throughout; a later one meets nobody.
    out = mean_slowdowns([("tp", 0.0, 1.0, 2), ("late", 5.0, 1.0, 1), ("empty", 1.0, 0.0, 1)], [1.0, 1.8])
    assert out == {"tp": pytest.approx(1.8), "late": pytest.approx(1.0), "empty": 1.0}


def test_identical_replicas_on_one_host_are_stretched_throughout():
    spec, links = _spec(), cm.Links()
    alone = predict(_plan(2, 2), spec, {"g": _group()}, links)
    shared = predict(_plan(2, 2), spec, {"g": _group(host="h", contention=(1.0, 1.5))}, links)
    assert shared.pipeline_time_s == pytest.approx(1.5 * alone.pipeline_time_s)
    assert shared.optimizer_s == pytest.approx(1.5 * alone.optimizer_s)  # both ranks step at once


def test_a_replica_that_finishes_first_leaves_the_host_to_the_other():
    # Replicas of 3 and 1 micro-batches (forward F, backward 2F): the short one's micro-batch overlaps
    # the long one's first (both 2x); the long one's other two run alone: 2 x 3F + 2 x 3F = 12F, against
    # 9F without contention.
    spec, links = _spec(), cm.Links()
    alone = predict(_plan(3, 1), spec, {"g": _group()}, links)
    shared = predict(_plan(3, 1), spec, {"g": _group(host="h", contention=(1.0, 2.0))}, links)
    assert shared.pipeline_time_s == pytest.approx(alone.pipeline_time_s * 12 / 9)
    # A single rank on the host has nobody to meet.
    one = predict(_plan(3), spec, {"g": _group(host="h", contention=(1.0, 2.0))}, links)
    assert one.pipeline_time_s == pytest.approx(predict(_plan(3), spec, {"g": _group()}, links).pipeline_time_s)


def test_a_sim_rank_contends_only_while_it_computes():
    # cpu(1) + sim(0.5), one shared profile: the sim idles after each chunk as long as it computed, so
    # the two ranks overlap less than fully: the step lies strictly between no contention and all of it.
    cluster = parse_cluster({"groups": [{"name": "fast", "backend": "cpu", "devices": 1, "memory_gb": 8},
                                        {"name": "slow", "backend": "sim", "devices": 1, "speed": 0.5,
                                         "memory_gb": 8}]})
    times = {f"{k}/1": v for k, v in {"dense": [0.01, 0.02], "embed": [0.0, 0.0], "head": [0.005, 0.01]}.items()}
    prof = Profile("cpu", "cpu", times=times, optimizer_s_per_param=1e-10, peak_tflops=1.0)
    plain = cluster_groups(cluster, prof)
    assert plain["fast"].host is None and plain["fast"].contention == ()
    prof.contention = [1.0, 2.0]
    groups = cluster_groups(cluster, prof)
    assert groups["fast"].host == groups["slow"].host == "local" and groups["slow"].contention == (1.0, 2.0)
    # Co-running profiles (one per group) already include their neighbours: no contention on top.
    own = cluster_groups(cluster, {"fast": prof, "slow": prof})
    assert own["fast"].host is None
    plan = {"layers": [2], "pipelines": [
        {"micro_batch_size": 1, "micro_batches": 2, "stages": [{"group": "fast", "tensor_parallel": 1}]},
        {"micro_batch_size": 1, "micro_batches": 2, "stages": [{"group": "slow", "tensor_parallel": 1}]}]}
    spec, links = _spec(), cm.Links()
    base = predict(plan, spec, plain, links).pipeline_time_s
    both = predict(plan, spec, groups, links).pipeline_time_s
    full = predict(plan, spec, {k: replace(g, speed=g.speed / 2) for k, g in plain.items()}, links).pipeline_time_s
    assert base < both < full
