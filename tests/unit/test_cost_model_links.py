"""Per-collective link figures (measured gloo collectives) in the cost model, on hand-computed cases."""
import pytest

from megahet.hetero import cost_model as cm
from megahet.hetero.profile import _TWO_RANKS, fit_link


def _spec(**kw):
    base = dict(num_layers=8, hidden=256, ffn=1024, heads=4, query_groups=4, kv_channels=64, seq=128,
                vocab=2048, swiglu=True, param_bytes=4, sequence_parallel=False)
    base.update(kw)
    return cm.ModelSpec(**base)


def _group(per_node=2):
    return cm.GroupSpec(name="cpu", backend="cpu", devices=2, devices_per_node=per_node, peak_tflops=1.0,
                        memory_gb=8.0, domain="gloo")


def _links():
    links = cm.Links()
    links.bandwidth["intra_node"], links.latency["intra_node"] = 4e9, 1e-4
    return links.apply_measured({"intra_node/all_reduce": [1e9, 1e-3], "intra_node/all_gather": [5e8, 2e-3],
                                 "intra_node/reduce_scatter": [2.5e8, 3e-3], "intra_node/all_to_all": [1e9, 5e-4]})


def test_params_prefer_the_measured_collective_and_fall_back_to_the_link():
    links = _links()
    assert links.params("intra_node", "all_reduce") == (1e9, 1e-3)
    assert links.params("intra_node") == (4e9, 1e-4)  # point-to-point: the link's own figures
    assert links.params("inter_node", "all_reduce") == (links.bandwidth["inter_node"], links.latency["inter_node"])


def test_apply_measured_leaves_links_the_cluster_spec_sets():
    links = cm.Links.from_cluster({"cross_domain": 0.05})
    links.apply_measured({"cross_domain": [3e9, 1e-4], "cross_domain/all_reduce": [1e9, 1e-3],
                          "intra_node": [2e9, 2e-4], "bogus": [1.0, 1.0]}, given={"cross_domain": 0.05})
    assert links.bandwidth["cross_domain"] == pytest.approx(0.05e9)
    assert "cross_domain/all_reduce" not in links.ops
    assert links.bandwidth["intra_node"] == 2e9 and links.latency["intra_node"] == 2e-4
    assert "bogus" not in links.bandwidth


def test_tp_comm_charges_measured_all_reduces_without_sp():
    # TP 2, mbs 2: [128, 2, 256] fp32 = 262,144 bytes per all-reduce; ring at 2 ranks: bytes / bw + 2 lat;
    # 4 per layer (2 forward, 2 backward) x 3 layers.
    nbytes = 128 * 2 * 256 * 4
    one = nbytes / 1e9 + 2 * 1e-3
    got = cm.tp_comm_time(_spec(), _group(), _links(), mbs=2, tp=2, layers=3)
    assert got == pytest.approx(4 * 3 * one)


def test_tp_comm_under_sequence_parallelism_is_all_gather_plus_reduce_scatter():
    nbytes = 128 * 2 * 256 * 4
    one = (0.5 * nbytes / 5e8 + 2e-3) + (0.5 * nbytes / 2.5e8 + 3e-3)
    got = cm.tp_comm_time(_spec(sequence_parallel=True), _group(), _links(), mbs=2, tp=2, layers=1)
    assert got == pytest.approx(4 * one)


def test_ep_comm_uses_the_measured_all_to_all_and_all_gather():
    spec = _spec(num_experts=4, topk=2, moe_ffn=256)
    nbytes = 2 * 128 * 2 * 256 * 4  # mbs 2 x seq 128 tokens, top-2, hidden 256, fp32
    per_layer = 4 * (0.5 * nbytes / 1e9 + 5e-4) + (0.5 * 2 * 4 * 8 / 5e8 + 2e-3)
    assert cm.ep_comm_time(spec, _group(), _links(), mbs=2, tp=1, ep=2, moe_layers=2) == pytest.approx(2 * per_layer)


def test_dp_reduction_in_one_domain_is_an_all_reduce_or_with_the_distributed_optimizer_rs_plus_ag():
    g = _group()
    grads = 28e6
    assert cm.dp_reduce_time(grads, [g], [2], _links(), 1, False, 4) == pytest.approx(grads / 1e9 + 2e-3)
    # Distributed optimizer, fp32 params: reduce-scatter of gradients, all-gather of parameters.
    want = (0.5 * grads / 2.5e8 + 3e-3) + (0.5 * grads / 5e8 + 2e-3)
    assert cm.dp_reduce_time(grads, [g], [2], _links(), 1, True, 4) == pytest.approx(want)


def test_fit_link_recovers_exact_points_and_two_rank_terms():
    pts = [(b, 2e-4 + b / 3e9) for b in (4096, 65536, 1 << 20, 1 << 23)]
    bw, lat = fit_link(pts)
    assert bw == pytest.approx(3e9, rel=1e-6) and lat == pytest.approx(2e-4, rel=1e-6)
    # An all-reduce measured at 2 ranks as t = a + b / B is 2 steps of latency a/2 and bandwidth B.
    assert _TWO_RANKS["all_reduce"] == (2, 1.0) and _TWO_RANKS["all_gather"] == (1, 0.5)


def test_step_scalar_all_reduces_hand_computed():
    # Token count (over replicas), gradient norm and loss: 3 all-reduces of a few bytes, each 2 log2(n)
    # latency steps.
    assert cm.small_allreduce_time(2, 1e-3) == pytest.approx(2e-3)
    assert cm.small_allreduce_time(16384, 1e-5) == pytest.approx(2 * 14 * 1e-5)
    assert cm.small_allreduce_time(1, 1.0) == 0.0
    links = _links()  # measured intra-node all-reduce: 1 ms per step
    assert cm.step_collectives_time([_group()], 2, links, dp=2) == pytest.approx(3 * 2e-3)
    assert cm.step_collectives_time([_group()], 1, links, dp=1) == 0.0
    # One replica (a pipeline): no token count across replicas, only the gradient norm and the loss.
    assert cm.step_collectives_time([_group()], 2, links, dp=1) == pytest.approx(2 * 2e-3)
    # cpu + sim: the world crosses domains, so the bridge's latency (not measured here: the link's own).
    sim = cm.GroupSpec(name="sim", backend="sim", devices=1, devices_per_node=1, peak_tflops=1.0, memory_gb=8.0,
                       domain="sim")
    assert cm.step_collectives_time([_group(), sim], 2, links, dp=2) == pytest.approx(
        3 * 2 * links.latency["cross_domain"])


def test_recompute_time_scales_the_layer_by_the_measured_checkpoint_ratio():
    from megahet.hetero.profile import Profile
    # Plain layer at mbs 2: 10 ms forward, 20 ms backward; checkpointed at mbs 2: 11 ms forward and
    # 22 ms backward (the forward rerun inside it): ratio 33 / 30 on the whole, 11 / 10 on the forward.
    prof = Profile(backend="cpu", key="k", times={"dense/2": [0.010, 0.020], "dense/4": [0.020, 0.040],
                                                   "dense-recompute/2": [0.011, 0.022]})
    assert prof.time("dense", 2) == (0.010, 0.020)  # the recompute key is not a micro-batch point
    f, b = prof.recompute_time("dense", 4)
    assert f == pytest.approx(0.022) and f + b == pytest.approx(0.060 * 33 / 30)
    g = _group()
    g.profile, g.speed = prof, 0.5
    t = cm.recompute_time(g, _spec(), "dense", 4, 2)  # sim speed 0.5 and TP 2 cancel: x 1
    assert t.fwd == pytest.approx(0.022) and t.bwd == pytest.approx(0.066 - 0.022)
    # Not measured: one more forward in backward.
    g.profile = Profile(backend="cpu", key="k", times={"dense/2": [0.010, 0.020]})
    t = cm.recompute_time(g, _spec(), "dense", 2, 1)
    assert (t.fwd, t.bwd) == (pytest.approx(0.020), pytest.approx(0.060))
