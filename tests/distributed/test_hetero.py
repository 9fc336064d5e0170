"""Heterogeneous plans (cpu + sim domains) give the single-process run's losses, to reduction order."""
import pytest
import torch

from megahet.testing import DistributedTestError, run_distributed
from tests.distributed.hetero_cases import (cluster_text, hierarchical_collectives, plan_text, train_with_fp32_backend,
                                            two_site_collectives)
from tests.distributed.train_cases import losses, train

TOL = 2e-5


def _run(world, tmp_path, name, **over):
    metrics = str(tmp_path / f"{name}.jsonl")
    return run_distributed(train, world, {"metrics_file": metrics, **over}, timeout=240)[0]


def _files(tmp_path, name, cluster, plan):
    c, p = tmp_path / f"{name}_cluster.yaml", tmp_path / f"{name}_plan.yaml"
    c.write_text(cluster)
    p.write_text(plan)
    return {"cluster": str(c), "plan": str(p)}


def _same(got, ref, tol=TOL):
    assert len(got) == len(ref) and got, (got, ref)
    for a, b in zip(got, ref):
        assert abs(a - b) < tol * abs(b), (got, ref)


def test_hierarchical_reduction_is_exact_and_bridges_only_shards():
    domains = ["cpu", "cpu", "cpu", "sim", "sim"]
    res = run_distributed(hierarchical_collectives, 5, domains, timeout=90)
    total = sum(torch.arange(10, dtype=torch.float32) * (r + 1) + 0.25 for r in range(5))
    for r in res:
        assert r["kind"] == "HierarchicalGroup"
        assert torch.equal(r["all_reduce"], total)  # same bits on every member
        assert r["max"] == 4.0 and r["gather"].tolist() == [0, 1, 2, 3, 4]
    # Each rank bridges only its domain's partial over its shard: 10 elements split 4,4,2 (cpu) / 5,5 (sim),
    # sent to the overlapping members of the other domain; in all 10 x 4 bytes per domain, not x members.
    assert sum(r["all_reduce_bridge_bytes"] for r in res[:3]) == 40
    assert sum(r["all_reduce_bridge_bytes"] for r in res[3:]) == 40
    y = sum(torch.arange(20, dtype=torch.float32).reshape(10, 2) * (r + 1) for r in range(5))
    for i, r in enumerate(res):
        torch.testing.assert_close(r["reduce_scatter"], y[2 * i:2 * i + 2].to(torch.bfloat16).float())


def test_hierarchical_reduction_over_three_domains_is_exact_on_every_member():
    """The first combine may write into a member's own partial; a member of the third domain must not."""
    domains = ["cpu", "cpu", "simA", "simB", "simB"]
    res = run_distributed(hierarchical_collectives, 5, domains, timeout=90)
    total = sum(torch.arange(10, dtype=torch.float32) * (r + 1) + 0.25 for r in range(5))
    for r in res:
        assert torch.equal(r["all_reduce"], total)
        assert r["max"] == 4.0


def test_one_vendor_on_two_sites_reduces_by_site_and_bridges_only_between_sites():
    res = run_distributed(two_site_collectives, 4, timeout=90)
    total = sum(torch.arange(10, dtype=torch.float32) * (r + 1) + 0.25 for r in range(4))
    for r in res:
        assert r["kind"] == "HierarchicalGroup" and torch.equal(r["all_reduce"], total)
    # Inside a site the reduce-scatter is native; each site sends its partial sums across once (10 x 4 bytes).
    assert sum(r["reduce_bridge_bytes"] for r in res[:2]) == 40 and sum(r["reduce_bridge_bytes"] for r in res[2:]) == 40
    assert res[0]["p2p_bridge_bytes"] == 0 and res[0]["p2p_native_bytes"] == 32  # 0 -> 1: same site
    assert res[1]["p2p_bridge_bytes"] == 32  # 1 -> 2: across sites, host-staged


def test_one_vendor_on_two_sites_trains_the_same_losses(tmp_path):
    """Two cpu groups on two sites: replicas on different sites reduce hierarchically, through the bridge."""
    ref = losses(_run(1, tmp_path, "ref", train_iters=3))
    cluster = ("groups:\n  - {name: east, backend: cpu, devices: 2, site: dc1}\n"
               "  - {name: west, backend: cpu, devices: 2, site: dc2}\n")
    plan = plan_text([3, 1], [(2, 2, [("east", 1), ("east", 1)]), (1, 4, [("west", 1), ("west", 1)])])
    rec = _run(4, tmp_path, "sites", train_iters=3, use_distributed_optimizer=True, overlap_grad_reduce=True,
               **_files(tmp_path, "sites", cluster, plan))
    _same(losses(rec), ref)
    assert all(b > 0 for b in rec[-1]["rank_bridge_bytes"]), rec[-1]["rank_bridge_bytes"]  # every rank's shards


CPU_SIM = cluster_text(("fast", "cpu", 1), ("slow", "sim", 1))


@pytest.mark.parametrize("order", [("fast", "slow"), ("slow", "fast")])
def test_uneven_pipeline_across_domains(tmp_path, order):
    ref = losses(_run(1, tmp_path, "ref", train_iters=3, num_layers=8))
    plan = plan_text([5, 3], [(2, 4, [(order[0], 1), (order[1], 1)])])
    rec = _run(2, tmp_path, "pp", train_iters=3, num_layers=8, **_files(tmp_path, "pp", CPU_SIM, plan))
    _same(losses(rec), ref)
    assert rec[-1]["bridge_bytes"] > 0  # the one link crosses domains
    assert set(rec[-1]["stages"]) == {"stage0", "stage1"} and rec[-1]["stages"]["stage1"]["compute_s"] > 0


def test_bridge_only_on_the_cross_domain_hop(tmp_path):
    untied = dict(num_layers=3, untie_embeddings_and_output_weights=True)
    ref = losses(_run(1, tmp_path, "ref", train_iters=2, **untied))
    cluster = cluster_text(("fast", "cpu", 2), ("slow", "sim", 1))
    plan = plan_text([1, 1, 1], [(2, 4, [("fast", 1), ("fast", 1), ("slow", 1)])])
    rec = _run(3, tmp_path, "hop", train_iters=2, **untied, **_files(tmp_path, "hop", cluster, plan))
    _same(losses(rec), ref)
    per_rank = rec[-1]["rank_bridge_bytes"]
    assert per_rank[0] == 0 and per_rank[1] > 0 and per_rank[2] > 0, per_rank  # cpu->cpu stays native


def test_interleaved_virtual_stages_across_domains(tmp_path):
    """Uneven stages (5 + 3) with 2 virtual stages each: chunks of 3 + 2 and 2 + 1 layers."""
    ref = losses(_run(1, tmp_path, "ref", train_iters=3, num_layers=8))
    plan = "virtual_stages: 2\n" + plan_text([5, 3], [(2, 4, [("fast", 1), ("slow", 1)])])
    rec = _run(2, tmp_path, "vpp", train_iters=3, num_layers=8, **_files(tmp_path, "vpp", CPU_SIM, plan))
    _same(losses(rec), ref)


def test_uneven_micro_batches_across_domains(tmp_path):
    ref = losses(_run(1, tmp_path, "ref", train_iters=3, global_batch_size=12))
    plan = plan_text([4], [(3, 2, [("fast", 1)]), (1, 6, [("slow", 1)])])
    rec = _run(2, tmp_path, "dp", train_iters=3, global_batch_size=12, **_files(tmp_path, "dp", CPU_SIM, plan))
    _same(losses(rec), ref)


@pytest.mark.parametrize("sp", [False, True])
def test_tp2_stage_feeds_tp1_stage_in_another_domain(tmp_path, sp):
    ref = losses(_run(1, tmp_path, "ref", train_iters=3))
    cluster = cluster_text(("fast", "cpu", 2), ("slow", "sim", 1))
    plan = plan_text([2, 2], [(2, 4, [("fast", 2), ("slow", 1)])])
    rec = _run(3, tmp_path, "tp", train_iters=3, sequence_parallel=sp, **_files(tmp_path, "tp", cluster, plan))
    _same(losses(rec), ref)


def test_two_pipelines_with_stage0_on_different_domains_distributed_optimizer(tmp_path):
    ref = losses(_run(1, tmp_path, "ref", train_iters=3))
    cluster = cluster_text(("fast", "cpu", 2), ("slow", "sim", 2))
    plan = plan_text([3, 1], [(2, 2, [("fast", 1), ("slow", 1)]), (1, 4, [("slow", 1), ("fast", 1)])])
    rec = _run(4, tmp_path, "dp_pp", train_iters=3, use_distributed_optimizer=True, overlap_grad_reduce=True,
               **_files(tmp_path, "dp_pp", cluster, plan))
    _same(losses(rec), ref)


def test_moe_plan_with_expert_parallel_inside_a_group_and_uneven_micro_batch_sizes(tmp_path):
    # The load-balancing loss is computed per micro-batch (as in Megatron), so only a zero coefficient
    # makes different micro-batch sizes comparable; the z-loss is per token and stays on.
    moe = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.0,
               moe_z_loss_coeff=0.001, moe_router_enable_expert_bias=True)
    ref = losses(_run(1, tmp_path, "ref", train_iters=3, **moe))
    cluster = cluster_text(("fast", "cpu", 2), ("slow", "sim", 2))
    plan = plan_text([2, 2], [(3, 2, [("fast", 1), ("slow", 1)]), (1, 2, [("fast", 1), ("slow", 1)])],
                     expert_parallel=2)
    rec = _run(4, tmp_path, "moe", train_iters=3, **moe, **_files(tmp_path, "moe", cluster, plan))
    _same(losses(rec), ref, tol=1e-4)


def test_resume_under_another_plan_and_hardware_mix(tmp_path):
    ref = losses(_run(1, tmp_path, "ref", train_iters=4))
    ck = str(tmp_path / "ck")
    cluster = cluster_text(("fast", "cpu", 2), ("slow", "sim", 1))
    plan = plan_text([3, 1], [(2, 4, [("fast", 2), ("slow", 1)])])
    _run(3, tmp_path, "save", train_iters=4, exit_interval=2, save=ck, **_files(tmp_path, "a", cluster, plan))
    other = plan_text([1, 3], [(3, 2, [("slow", 1), ("fast", 1)]), (1, 2, [("fast", 1), ("slow", 1)])])
    resumed = _run(4, tmp_path, "load", train_iters=4, load=ck, use_distributed_optimizer=True,
                   **_files(tmp_path, "b", cluster_text(("fast", "cpu", 2), ("slow", "sim", 2)), other))
    _same(losses(resumed), ref[2:])


def test_plan_that_cannot_run_is_one_line(tmp_path):
    plan = plan_text([4], [(2, 2, [("fast", 1)]), (2, 1, [("slow", 1)])])
    with pytest.raises(DistributedTestError, match=r"megahet|plan micro-batches 2x2 \+ 2x1 = 6 samples"):
        _run(2, tmp_path, "bad", train_iters=1, **_files(tmp_path, "bad", CPU_SIM, plan))


def test_stage_on_a_backend_without_bf16_computes_in_fp32(tmp_path):
    """--bf16 with the last stage on a device that declares no bf16: that stage computes fp32 (its
    neighbour's bf16 activations are cast on arrival), the rest bf16; the run tracks the fp32 one."""
    ref = losses(_run(1, tmp_path, "ref", train_iters=3))
    cluster = "groups:\n  - {name: fast, backend: cpu, devices: 1}\n  - {name: old, backend: sim_fp32, devices: 1}\n"
    files = _files(tmp_path, "fp32", cluster, plan_text([2, 2], [(2, 4, [("fast", 1), ("old", 1)])]))
    rec = run_distributed(train_with_fp32_backend, 2, {"metrics_file": str(tmp_path / "fp32.jsonl"), "train_iters": 3,
                                                       "bf16": True, **files}, timeout=240)[0]
    _same(losses(rec), ref, tol=2e-2)  # bf16 first stage: close to fp32, not bit-equal


def test_timing_trace_has_one_row_per_rank_named_by_group(tmp_path):
    import json
    trace = tmp_path / "trace.json"
    cluster = cluster_text(("fast", "cpu", 2), ("slow", "sim", 1))
    plan = plan_text([2, 2], [(2, 4, [("fast", 2), ("slow", 1)])])
    _run(3, tmp_path, "trace", train_iters=2, timing_trace=str(trace), **_files(tmp_path, "trace", cluster, plan))
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M"}
    assert names == {0: "rank 0: p0 s0 tp0 fast/cpu", 1: "rank 1: p0 s0 tp1 fast/cpu", 2: "rank 2: p0 s1 tp0 slow/sim"}
    assert {e["pid"] for e in events if e.get("ph") == "X"} == {0, 1, 2}
