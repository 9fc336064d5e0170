"""The pretraining loop: exact resume, resharding across layouts, precision paths, bad input."""
import json
import os

import pytest
import torch

from megahet.testing import DistributedTestError, run_distributed
from tests.distributed.train_cases import losses, train


def _run(world, tmp_path, name, **over):
    metrics = str(tmp_path / f"{name}.jsonl")
    res = run_distributed(train, world, {"metrics_file": metrics, **over}, timeout=180)
    return res[0]


def test_resume_is_exact(tmp_path):
    straight = _run(1, tmp_path, "straight", train_iters=6)
    ck = str(tmp_path / "ck")
    first = _run(1, tmp_path, "first", train_iters=6, exit_interval=3, save=ck)
    assert os.path.exists(os.path.join(ck, "iter_0000003", "meta.json"))
    second = _run(1, tmp_path, "second", train_iters=6, save=ck, load=ck)
    assert losses(straight)[:3] == losses(first)
    assert losses(second) == losses(straight)[3:]  # bit-identical: same data position, RNG, optimizer
    assert [r["iteration"] for r in second] == [4, 5, 6]
    assert second[-1]["consumed_samples"] == 48
    for key in ("iteration", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "consumed_samples"):
        assert key in straight[-1]
    assert losses(straight)[-1] < losses(straight)[0]


@pytest.mark.parametrize("save_layout,load_layout", [
    (dict(world=2, tensor_model_parallel_size=2), dict(world=1)),
    (dict(world=2, pipeline_model_parallel_size=2), dict(world=1)),
    (dict(world=1), dict(world=2, pipeline_model_parallel_size=2)),
    (dict(world=2, use_distributed_optimizer=True), dict(world=2, tensor_model_parallel_size=2)),
])
def test_checkpoint_reshards_across_layouts(tmp_path, save_layout, load_layout):
    ref = _run(1, tmp_path, "ref", train_iters=4)
    ck = str(tmp_path / "ck")
    sw = save_layout.pop("world")
    lw = load_layout.pop("world")
    _run(sw, tmp_path, "save", train_iters=4, exit_interval=2, save=ck, **save_layout)
    resumed = _run(lw, tmp_path, "load", train_iters=4, load=ck, **load_layout)
    for a, b in zip(losses(resumed), losses(ref)[2:]):
        assert abs(a - b) < 2e-5 * abs(b), (losses(resumed), losses(ref))


def test_bf16_and_fp16_paths_train(tmp_path):
    fp32 = losses(_run(1, tmp_path, "fp32", train_iters=4))
    for flag in ("bf16", "fp16"):
        got = losses(_run(1, tmp_path, flag, train_iters=4, **{flag: True}))
        assert len(got) == 4 and all(abs(a - b) < 0.05 * b for a, b in zip(got, fp32)), (flag, got, fp32)


def test_nan_loss_skips_then_stops(tmp_path):
    with pytest.raises(DistributedTestError, match="consecutive steps had NaN/Inf.*--max-skipped-steps 2"):
        _run(1, tmp_path, "nan", train_iters=8, lr=1e38, min_lr=0.0, clip_grad=0.0, max_skipped_steps=2,
             weight_decay=0.0)


def test_unwritable_save_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DistributedTestError, match="cannot write checkpoints to .*pass a writable --save"):
        _run(1, tmp_path, "ro", train_iters=3, save=str(blocker / "sub"))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    ck = str(tmp_path / "ck")
    _run(1, tmp_path, "a", train_iters=3, save=ck)
    with pytest.raises(DistributedTestError, match="different model shape"):
        _run(1, tmp_path, "b", train_iters=3, load=ck, hidden_size=64)


MOE = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32,
           moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, moe_router_enable_expert_bias=True)


def test_moe_checkpoint_saved_at_ep2_resumes_at_ep1(tmp_path):
    ref = _run(1, tmp_path, "ref", train_iters=4, **MOE)
    assert "moe_aux_loss" in ref[-1] and "moe/layer_0/tokens_per_expert" in json.dumps(ref[-1])
    ck = str(tmp_path / "ck")
    _run(2, tmp_path, "save", train_iters=4, exit_interval=2, save=ck, expert_model_parallel_size=2, **MOE)
    resumed = _run(1, tmp_path, "load", train_iters=4, load=ck, **MOE)
    for a, b in zip(losses(resumed), losses(ref)[2:]):
        assert abs(a - b) < 2e-5 * abs(b), (losses(resumed), losses(ref))


def test_mixed_backends_train_like_one_process(tmp_path):
    """A CPU rank and a simulated device in another communication domain (bridged DP and world
    groups) give the losses of the single-process run."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("groups:\n  - {name: fast, backend: cpu, devices: 1}\n"
                       "  - {name: slow, backend: sim, devices: 1, speed: 0.8}\n")
    ref = losses(_run(1, tmp_path, "ref", train_iters=3))
    mixed = losses(_run(2, tmp_path, "mixed", train_iters=3, cluster=str(cluster), use_distributed_optimizer=True))
    for a, b in zip(mixed, ref):
        assert abs(a - b) < 2e-5 * abs(b), (mixed, ref)
    mixed_pp = losses(_run(2, tmp_path, "mixed_pp", train_iters=3, cluster=str(cluster),
                           pipeline_model_parallel_size=2))
    for a, b in zip(mixed_pp, ref):
        assert abs(a - b) < 2e-5 * abs(b), (mixed_pp, ref)


def test_timing_trace_of_a_pipeline_run(tmp_path):
    trace = tmp_path / "trace.json"
    _run(2, tmp_path, "trace", train_iters=2, pipeline_model_parallel_size=2, timing_trace=str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["name"] for e in events if e.get("ph") == "X"}
    assert any(n.startswith("F") for n in names) and any(n.startswith("B") for n in names)
    assert {e["pid"] for e in events if e.get("ph") == "X"} == {0, 1}
    assert (tmp_path / "trace.png").stat().st_size > 1000


def test_train_samples_and_exit_duration(tmp_path):
    by_samples = _run(1, tmp_path, "samples", train_iters=None, train_samples=16)
    assert [r["iteration"] for r in by_samples] == [1, 2]
    ck = str(tmp_path / "ck")
    timed = _run(1, tmp_path, "timed", train_iters=5, exit_duration_in_mins=0.0, save=ck)
    assert [r["iteration"] for r in timed] == [1]  # over the time budget after the first step: save, exit
    assert os.path.exists(os.path.join(ck, "iter_0000001", "meta.json"))
