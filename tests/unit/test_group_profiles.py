"""The planner with each cpu/sim group's own measured profile (co-running) instead of the CPU's x speed."""
import pytest

from megahet.config import build_config
from megahet.hetero import cost_model as cm
from megahet.hetero.autoplan import local_speeds
from megahet.hetero.cluster import parse_cluster
from megahet.hetero.planner import Constraints, Settings, cluster_groups, search
from megahet.hetero.profile import Profile

CPU_SIM = parse_cluster({"groups": [{"name": "fast", "backend": "cpu", "devices": 1, "memory_gb": 8},
                                    {"name": "slow", "backend": "sim", "devices": 1, "speed": 0.5, "memory_gb": 8}]})


def _profile(backend, per_sample, peak):
    """Times proportional to the micro-batch size: `per_sample` seconds fwd+bwd per sample and layer."""
    times = {}
    for b in (1, 2, 4):
        times.update({f"dense/{b}": [per_sample * b / 3, 2 * per_sample * b / 3], f"embed/{b}": [0.0, 0.0],
                      f"head/{b}": [0.01 * b, 0.02 * b]})
    return Profile(backend, backend, times=times, optimizer_s_per_param=1e-9, peak_tflops=peak)


def _spec():
    cfg = build_config(overrides=dict(num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=64,
                                      vocab_size=1000, global_batch_size=48, micro_batch_size=1, mock_data=True,
                                      train_iters=1), validate=False)
    return cm.ModelSpec.from_config(cfg)


def test_a_groups_own_profile_is_used_as_measured_and_a_shared_one_is_scaled_by_speed():
    spec = _spec()
    cpu, sim_own = _profile("cpu", 0.3, 1.0), _profile("sim", 0.3 / 0.4, 0.5)
    shared = cluster_groups(CPU_SIM, cpu)
    own = cluster_groups(CPU_SIM, {"fast": cpu, "slow": sim_own})
    assert shared["slow"].speed == 0.5 and own["slow"].speed == 1.0
    assert own["slow"].profile is sim_own and own["fast"].profile is cpu
    assert own["slow"].peak_tflops == 0.5 and shared["slow"].peak_tflops == 0.5
    t_shared = cm.compute_time(shared["slow"], spec, "dense", 2, 1)
    t_own = cm.compute_time(own["slow"], spec, "dense", 2, 1)
    assert t_shared.fwd + t_shared.bwd == pytest.approx(0.6 / 0.5)
    assert t_own.fwd + t_own.bwd == pytest.approx(0.6 / 0.4)  # its own, not 0.5 x the CPU's


def test_the_data_parallel_split_follows_the_measured_speed():
    spec = _spec()
    cpu = _profile("cpu", 0.3, 1.0)

    def sim_samples(profiles):
        res = search(spec, cluster_groups(CPU_SIM, profiles), cm.Links(), 48,
                     Constraints(layout="split", recompute=None), Settings(max_virtual_stages=1))
        assert sum(p["micro_batch_size"] * p["micro_batches"] for p in res.plan["pipelines"]) == 48
        return sum(p["micro_batch_size"] * p["micro_batches"] for p in res.plan["pipelines"]
                   if p["stages"][0]["group"] == "slow")

    assert sim_samples(cpu) == 16  # assumed 0.5: 48 x 0.5 / 1.5
    assert sim_samples({"fast": cpu, "slow": _profile("sim", 0.3 / 0.4, 0.5)}) == 14  # measured 0.4: 13.7


def test_local_speeds_lists_every_cpu_and_sim_rank_in_order():
    cluster = parse_cluster({"groups": [{"name": "a", "backend": "cpu", "devices": 2},
                                        {"name": "g", "backend": "cuda", "devices": 4, "tflops": 10, "memory_gb": 8},
                                        {"name": "b", "backend": "sim", "devices": 1, "speed": 0.25}]})
    assert local_speeds(cluster) == [("a", 1.0), ("a", 1.0), ("b", 0.25)]
