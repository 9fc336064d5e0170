"""The per-rank memory a cpu process holds outside the model: measured by a one-layer probe job,
charged on every cpu/sim rank."""
import pytest

from megahet.config import build_config
from megahet.hetero import cost_model as cm
from megahet.hetero.cluster import parse_cluster
from megahet.hetero.planner import cluster_groups
from megahet.hetero.predict import predict
from megahet.hetero.process_memory import predicted_model_bytes, probe_overrides, runtime_overhead
from megahet.hetero.profile import Profile

MODEL = dict(hidden_size=64, num_attention_heads=2, seq_length=32, vocab_size=256, num_layers=6,
             micro_batch_size=2, global_batch_size=8, mock_data=True)


def test_probe_is_the_same_model_with_one_layer_and_one_micro_batch():
    cfg = build_config(overrides=MODEL, validate=False)
    o = probe_overrides(cfg)
    assert o["num_layers"] == 1 and o["global_batch_size"] == o["micro_batch_size"] == 2
    assert (o["hidden_size"], o["num_attention_heads"], o["seq_length"], o["vocab_size"]) == (64, 2, 32, 256)
    probe = build_config(overrides=o, validate=False)
    # Hand count for the one-layer fp32 model: layer 2*64 norms + 64*192 qkv + 64*64 proj
    # + 64*2*ffn + ffn*64 (SwiGLU off by default: one fc1 chunk), embedding 256*64, final norm 64 (tied head).
    ffn = probe.model.ffn_hidden_size
    chunks = 2 if probe.model.swiglu else 1
    params = 2 * 64 + 64 * 192 + 64 * 64 + 64 * chunks * ffn + ffn * 64 + 256 * 64 + 64
    states = params * 4 * 4  # fp32 params, fp32 grads, two Adam moments (no separate master)
    spec = cm.ModelSpec.from_config(probe)
    assert cm.state_bytes(spec, cm.stage_params(spec, [0], 1, 1, True, True, 1), 1, 1, False).states == states
    # Plus one micro-batch's activations (64 tokens: layer, embedding output, fp32 logits of 256).
    extra = predicted_model_bytes(probe) - states
    assert 64 * (64 * 4 + 256 * 4) < extra < 64 * 64 * 1024


def test_measured_overhead_is_charged_on_every_cpu_and_sim_rank():
    cluster = parse_cluster({"groups": [{"name": "fast", "backend": "cpu", "devices": 1, "memory_gb": 8},
                                        {"name": "slow", "backend": "sim", "devices": 1, "speed": 0.5,
                                         "memory_gb": 8}]})
    prof = Profile(backend="cpu", key="k", times={"dense/2": [0.01, 0.02], "head/2": [0.005, 0.01]},
                   optimizer_s_per_param=1e-9, peak_tflops=0.1, reserved_bytes=80e6)
    groups = cluster_groups(cluster, prof)
    assert groups["fast"].reserved_gb == groups["slow"].reserved_gb == pytest.approx(0.08)
    spec = cm.ModelSpec(num_layers=4, hidden=64, ffn=256, heads=2, query_groups=2, kv_channels=32, seq=32,
                        vocab=256, param_bytes=4)
    plan = {"layers": [2, 2], "pipelines": [{"micro_batch_size": 2, "micro_batches": 4,
                                             "stages": [{"group": "fast", "tensor_parallel": 1},
                                                        {"group": "slow", "tensor_parallel": 1}]}]}
    pred = predict(plan, spec, groups, cm.Links())
    for stage in pred.stages:
        assert stage.memory.reserved == pytest.approx(80e6)
        assert stage.memory.total == pytest.approx(stage.memory.states + stage.memory.activations
                                                   + stage.memory.buffers + 80e6)
    # Without a measurement a cpu rank is charged nothing extra (GPU/NPU: the documented RESERVED_GB).
    bare = cluster_groups(cluster, Profile(backend="cpu", key="k", times=prof.times, peak_tflops=0.1))
    assert bare["fast"].reserved_gb == cm.RESERVED_GB["cpu"] == 0.0


def test_probe_runs_in_a_fresh_process_and_finds_a_fixed_overhead(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAHET_CACHE_DIR", str(tmp_path))
    cfg = build_config(overrides=MODEL, validate=False)
    overhead = runtime_overhead(cfg)
    # torch's and the runtime's own buffers: tens of MB on this host, far more than the tiny model.
    assert 5e6 < overhead < 2e9
    assert runtime_overhead(cfg) == overhead  # cached
    assert list(tmp_path.glob("profiles/process-*.json"))
