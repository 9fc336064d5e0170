"""Auto-planning (tools/plan.py's plan_job, --cluster without --plan's plan_at_start / choose_plan) prices
links with gloo's figures measured here (cached: measured once), spec-set links winning, and charges
what a cpu/sim rank holds outside the model. Measurement itself is faked here (counted); the real one
runs in tests/distributed/test_autoplan_links.py."""
import json
import os

import pytest

from megahet.config import build_config
from megahet.errors import MegahetError
from megahet.hetero import autoplan
from megahet.hetero import cost_model as cm
from megahet.hetero import process_memory
from megahet.hetero import profile as profile_mod
from megahet.hetero.cluster import parse_cluster
from megahet.hetero.profile import Profile

GB = cm.GB
# Slow gloo figures, far from the defaults (100 GB/s, 5 us intra-node): what the fake measurement returns.
SLOW = {"intra_node": [0.5e9, 1e-3], "cross_domain": [0.5e9, 1e-3],
        "intra_node/all_reduce": [0.2e9, 2e-3], "cross_domain/all_reduce": [0.2e9, 2e-3]}
for _op in ("all_gather", "reduce_scatter", "all_to_all"):
    SLOW[f"intra_node/{_op}"] = SLOW[f"cross_domain/{_op}"] = [0.2e9, 2e-3]


def _cfg(**kw):
    base = dict(num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=64, vocab_size=1000,
                global_batch_size=8, micro_batch_size=1, train_iters=1, mock_data=True)
    base.update(kw)
    return build_config(overrides=base, validate=False)


def _cluster(memory_gb=8.0, links=None):
    raw = {"groups": [{"name": "fast", "backend": "cpu", "devices": 2, "memory_gb": memory_gb},
                      {"name": "slow", "backend": "sim", "devices": 1, "speed": 0.5, "memory_gb": memory_gb}]}
    if links:
        raw["links"] = links
    return parse_cluster(raw)


def _profile(backend, per_sample):
    times = {}
    for b in (1, 2, 4):
        times.update({f"dense/{b}": [per_sample * b / 3, 2 * per_sample * b / 3], f"embed/{b}": [1e-4 * b, 1e-4 * b],
                      f"head/{b}": [2e-3 * b, 4e-3 * b]})
    return Profile(backend, f"fake-{backend}", times=times, optimizer_s_per_param=1e-9, peak_tflops=0.1)


class Counter:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.value


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A fresh cache dir; profiles, gloo links and the process probe faked and counted."""
    monkeypatch.setenv("MEGAHET_CACHE_DIR", str(tmp_path / "cache"))
    probes = {"profiles": Counter({"fast": _profile("cpu", 0.03), "slow": _profile("sim", 0.06)}),
              "links": Counter(SLOW), "overhead": Counter(0.3 * GB)}
    monkeypatch.setattr(autoplan, "measure_profiles", lambda *a, **k: probes["profiles"]())
    monkeypatch.setattr(profile_mod, "measure_links", probes["links"])
    monkeypatch.setattr(process_memory, "runtime_overhead", probes["overhead"])
    return probes


def test_measured_links_price_tensor_parallel_communication(fake):
    cfg = _cfg()
    tp2 = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "data_parallel_size": 1,
           "micro_batch_size": 1, "recompute_granularity": None}
    cluster = _cluster()
    measured = autoplan.plan_job(cfg, cluster, tp2, allow_idle=True)
    # The same plan with every link kind set in the spec: the defaults' figures, nothing measured applies.
    spec_set = _cluster(links={"intra_node": 100, "inter_node": 25, "cross_domain": 10})
    default = autoplan.plan_job(cfg, spec_set, tp2, allow_idle=True)
    assert measured.plan["pipelines"] == default.plan["pipelines"]
    assert measured.prediction.stages[0].tp == 2
    spec = cm.ModelSpec.from_config(cfg)
    group = autoplan.cluster_groups(cluster, fake["profiles"].value)["fast"]
    extra = (cm.tp_comm_time(spec, group, autoplan.job_links(cluster, SLOW), 1, 2, 4)
             - cm.tp_comm_time(spec, group, cm.Links.from_cluster({}), 1, 2, 4))
    assert extra > 1e-2  # 16 all-reduces of 2 ms each, at least
    got = [s.fwd_s + s.bwd_s for s in measured.prediction.stages]
    want = [s.fwd_s + s.bwd_s + extra for s in default.prediction.stages]
    assert got == pytest.approx(want, rel=1e-9)
    assert measured.prediction.step_time_s > default.prediction.step_time_s + 8 * extra * 0.99


def test_links_are_measured_once_then_read_from_the_cache(fake, tmp_path):
    cfg = _cfg()
    first = autoplan.plan_at_start(cfg, _cluster())
    assert fake["links"].calls == 1
    files = [f for f in os.listdir(tmp_path / "cache" / "profiles") if f.startswith("links-")]
    assert len(files) == 1
    second = autoplan.plan_at_start(_cfg(), _cluster())
    again = autoplan.plan_job(_cfg(), _cluster())
    assert fake["links"].calls == 1  # the job start and tools/plan.py read the same cached figures
    assert second.plan == first.plan
    assert second.prediction.step_time_s == first.prediction.step_time_s
    assert again.prediction.framework_s == first.prediction.framework_s  # the same measured figures
    # Another local world size is another job: measured again.
    bigger = parse_cluster({"groups": [{"name": "fast", "backend": "cpu", "devices": 4, "memory_gb": 8}]})
    autoplan.plan_at_start(_cfg(), bigger)
    assert fake["links"].calls == 2


def test_choose_plan_predicts_with_the_measured_links(fake):
    slow = autoplan.plan_at_start(_cfg(), _cluster())
    fast = autoplan.plan_at_start(_cfg(), _cluster(links={"intra_node": 100, "cross_domain": 10}))
    assert fake["links"].calls == 1
    # Every plan of three ranks communicates (DP, PP or TP) and makes the step's scalar all-reduces.
    assert slow.prediction.step_time_s > fast.prediction.step_time_s + 6 * 2e-3
    # Three scalar all-reduces over 3 ranks in two domains: 2 x ceil(log2 3) = 4 latency steps each, of
    # the measured cross-domain all-reduce (2 ms) or the spec's link (default latency 0.1 ms).
    assert slow.prediction.framework_s == pytest.approx(3 * 4 * 2e-3)
    assert fast.prediction.framework_s == pytest.approx(3 * 4 * 1e-4)
    plan = autoplan.choose_plan(_cfg(), _cluster())
    assert plan.predicted["step_time_s"] == round(slow.prediction.step_time_s, 6)


def test_spec_set_links_win_over_measured_ones():
    links = autoplan.job_links(_cluster(links={"intra_node": 40}), SLOW)
    assert links.bandwidth["intra_node"] == 40 * GB and links.latency["intra_node"] == cm.DEFAULT_LATENCY["intra_node"]
    assert links.params("intra_node", "all_reduce") == (40 * GB, cm.DEFAULT_LATENCY["intra_node"])
    assert links.bandwidth["cross_domain"] == SLOW["cross_domain"][0]
    assert links.params("cross_domain", "all_reduce") == tuple(SLOW["cross_domain/all_reduce"])


def test_links_are_measured_only_for_two_or_more_local_ranks_of_cpu_and_sim_alone(fake):
    one = parse_cluster({"groups": [{"name": "fast", "backend": "cpu", "devices": 1}]})
    with_gpus = parse_cluster({"groups": [{"name": "fast", "backend": "cpu", "devices": 2},
                                          {"name": "gpu", "backend": "cuda", "devices": 8, "tflops": 300,
                                           "memory_gb": 80}]})
    assert autoplan.measured_links(one) == {} and autoplan.measured_links(with_gpus) == {}
    assert fake["links"].calls == 0
    assert autoplan.measured_links(_cluster()) == SLOW and fake["links"].calls == 1


def test_no_profile_measures_no_links(fake):
    cfg = _cfg()
    flops = parse_cluster({"groups": [{"name": "fast", "backend": "cpu", "devices": 2, "tflops": 0.2, "memory_gb": 8}]})
    autoplan.plan_job(cfg, flops, measure=False)
    assert fake["links"].calls == 0 and fake["overhead"].calls == 0


def test_a_failed_measurement_is_cached_so_every_local_rank_plans_alike(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MEGAHET_CACHE_DIR", str(tmp_path))
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("rank 1 failed:\nOSError: address in use")

    monkeypatch.setattr(profile_mod, "measure_links", broken)
    assert profile_mod.load_or_measure_links(2, 1) == {}
    assert profile_mod.load_or_measure_links(2, 1) == {}  # another rank of the same start: no second try
    assert len(calls) == 1
    assert "address in use" in caplog.text
    monkeypatch.setattr(profile_mod, "LINKS_RETRY_S", 0.0)  # a later job measures again
    monkeypatch.setattr(profile_mod, "measure_links", lambda *a, **k: SLOW)
    assert profile_mod.load_or_measure_links(2, 1) == SLOW
    assert profile_mod.load_or_measure_links(2, 1) == SLOW


def test_plan_job_charges_the_process_overhead_on_every_cpu_and_sim_rank(fake):
    res = autoplan.plan_job(_cfg(), _cluster())
    assert fake["overhead"].calls == 1
    assert all(s.memory.reserved == pytest.approx(0.3 * GB) for s in res.prediction.stages)
    fake["overhead"].value = 0.0
    bare = autoplan.plan_job(_cfg(), _cluster())
    assert bare.plan["pipelines"] == res.plan["pipelines"]
    for name, g in res.prediction.groups.items():
        if g["devices_used"]:
            assert g["memory_gb"] == pytest.approx(bare.prediction.groups[name]["memory_gb"] + 0.3, abs=2e-4)


def test_job_start_skips_the_probe_with_memory_to_spare_and_charges_a_cached_figure(fake):
    cfg = _cfg()
    spare = autoplan.plan_at_start(cfg, _cluster())
    assert fake["overhead"].calls == 0
    assert all(s.memory.reserved == 0.0 for s in spare.prediction.stages)
    # Measured before (tools/plan.py, an earlier job): charged for free.
    path = process_memory._cache_path(process_memory.probe_overrides(cfg))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"runtime_overhead_bytes": 0.25 * GB}, fh)
    assert process_memory.cached_overhead(cfg) == 0.25 * GB
    cached = autoplan.plan_at_start(cfg, _cluster())
    assert fake["overhead"].calls == 0
    assert all(s.memory.reserved == pytest.approx(0.25 * GB) for s in cached.prediction.stages)
    assert cached.plan["pipelines"] == spare.plan["pipelines"]


def test_job_start_measures_the_overhead_when_memory_is_short_and_plans_with_it(fake):
    cfg = _cfg()
    need = max(g["memory_gb"] for g in autoplan.plan_at_start(cfg, _cluster()).prediction.groups.values())
    tight = _cluster(memory_gb=need + 0.5)  # less headroom than RESERVED_MARGIN_GB
    res = autoplan.plan_at_start(cfg, tight)
    assert fake["overhead"].calls == 1
    assert all(s.memory.reserved == pytest.approx(0.3 * GB) for s in res.prediction.stages)
    assert all(g["memory_gb"] <= g["memory_limit_gb"] for g in res.prediction.groups.values())
    # An overhead larger than any plan leaves free: nothing fits, and the error names a group.
    fake["overhead"].value = 50 * GB
    with pytest.raises(MegahetError, match="fast|slow"):
        autoplan.plan_at_start(_cfg(), tight)
