"""Data parallelism and the optimizers give the single-process update, whatever the layout.

Every case runs the same global batches (4 samples, micro-batches of one) and is compared with the
one-process run: losses, job-wide grad norms (which catch averaging or double counting that Adam's
scale invariance would hide) and the full parameters after every step.
"""
import math

import pytest
import torch

from megahet.testing import run_distributed
from tests.distributed.dp_cases import run_case, run_pipeline_case

ATOL = 2e-5  # summation order differs between layouts; Adam steps are ~1e-2 (eps 1e-5 keeps tiny grads linear)


@pytest.fixture(scope="module")
def reference():
    """DP=1, four steps; optimizer state after three (for the checkpoint test)."""
    return run_distributed(run_case, 1, batches=(0, 1, 2, 3), snapshot_at=3, timeout=60)[0]


@pytest.fixture(scope="module")
def dp2_even():
    return run_distributed(run_case, 2, dp=2, timeout=90)


def _assert_params(got, want, atol=ATOL, rtol=0.0):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=name)


def _assert_matches(ref, results, steps=3, atol=ATOL, rel=1e-5):
    for r in results:
        assert r["ok"] == [True] * steps
        assert r["losses"] == pytest.approx(ref["losses"][:steps], rel=rel)
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"][:steps], rel=rel)
        for i in range(steps + 1):
            _assert_params(r["params"][i], ref["params"][i], atol=atol)
    # Replicas hold bit-identical weights (the all-reduce / all-gather leaves no drift).
    for r in results[1:]:
        _assert_params(r["params"][-1], results[0]["params"][-1], atol=0)


def test_reference_moves_and_clips(reference):
    assert reference["ok"] == [True] * 4
    assert all(n > 0.5 for n in reference["grad_norms"])  # above clip_grad=0.5: clipping is exercised
    moved = max((reference["params"][3][n] - reference["params"][0][n]).abs().max().item()
                for n in reference["params"][0])
    assert moved > 1e-2


@pytest.mark.parametrize("kwargs", [
    None,
    dict(dist_opt=True),
    dict(overlap=True, bucket_size=2000),
    dict(overlap=True, bucket_size=2000, dist_opt=True),
], ids=["allreduce", "distopt", "overlap", "overlap-distopt"])
def test_dp2_matches_single_process(reference, dp2_even, kwargs):
    results = dp2_even if kwargs is None else run_distributed(run_case, 2, dp=2, timeout=90, **kwargs)
    kwargs = kwargs or {}
    _assert_matches(reference, results)
    buckets = results[0]["dtypes"]["buckets"]
    if kwargs.get("overlap"):
        assert buckets > 3
        # Every bucket started reducing inside backward (hooks), none waited for finish_grad_sync.
        assert all(r["launched_in_backward"] == [buckets] * 3 for r in results)
    else:
        assert all(r["launched_in_backward"] == [0] * 3 for r in results)


def test_dp2_tp2_sequence_parallel_distributed_optimizer(reference):
    results = run_distributed(run_case, 4, dp=2, tp=2, sp=True, dist_opt=True, bucket_size=3000, timeout=120)
    _assert_matches(reference, results)


def test_uneven_split_gives_the_even_update(reference, dp2_even):
    uneven = run_distributed(run_case, 2, dp=2, split=[3, 1], timeout=90)
    _assert_matches(reference, uneven)
    for i in range(1, 4):
        _assert_params(uneven[0]["params"][i], dp2_even[0]["params"][i])


def test_bf16_params_track_fp32(reference):
    results = run_distributed(run_case, 2, dp=2, dtype="bf16", dist_opt=True, timeout=90)
    r = results[0]
    assert r["dtypes"] == {"param": "torch.bfloat16", "main_grad": "torch.float32", "master": "torch.float32",
                           "buckets": 1}
    assert r["ok"] == [True] * 3
    assert r["losses"] == pytest.approx(reference["losses"][:3], abs=3e-2)
    assert r["grad_norms"] == pytest.approx(reference["grad_norms"][:3], rel=5e-2)
    for name, want in reference["params"][3].items():
        # bf16 compute and rounding (ulp 2^-8 relative) move each tensor's 3-step update by a few percent.
        ref_update = want - reference["params"][0][name]
        err = (r["params"][-1][name] - want).norm() / ref_update.norm()
        assert err < 0.25, (name, float(err))
    _assert_params(results[1]["params"][-1], r["params"][-1], atol=0)


@pytest.mark.parametrize("dist_opt", [False, True], ids=["allreduce", "distopt"])
def test_nan_on_one_rank_skips_the_step_everywhere(reference, dist_opt):
    # Step 0 sees batch 0 and a NaN on rank 1 only (after the reduction): every rank must skip, the
    # dynamic scale backs off, and the run then continues exactly like the reference.
    results = run_distributed(run_case, 2, dp=2, dist_opt=dist_opt, batches=(0, 0, 1, 2), nan_at=0,
                              loss_scale=1024.0, timeout=90)
    for r in results:
        assert r["ok"] == [False, True, True, True]
        assert math.isnan(r["grad_norms"][0])
        assert r["scales"][0] == 512.0
        _assert_params(r["params"][1], r["params"][0], atol=0)  # untouched by the skipped step
        assert r["losses"][1:] == pytest.approx(reference["losses"][:3], rel=1e-5)
        _assert_params(r["params"][-1], reference["params"][3])


def test_distributed_optimizer_state_is_layout_independent(reference):
    dp2 = run_distributed(run_case, 2, dp=2, dist_opt=True, batches=(0, 1, 2, 3), snapshot_at=3, timeout=90)
    state = dp2[0]["state"]
    assert set(state) == set(reference["state"])
    for name, want in reference["state"].items():
        assert set(state[name]) == {"master", "exp_avg", "exp_avg_sq", "step"}
        assert float(state[name]["step"]) == 3.0
        for key in ("master", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[name][key], want[key], atol=ATOL, rtol=1e-4, msg=f"{name} {key}")
        torch.testing.assert_close(dp2[1]["state"][name]["master"], state[name]["master"], atol=0, rtol=0)
    # Reload the DP=2 state into a fresh DP=1 optimizer (padding rows restored as zeros) and step once more.
    full = {}
    for name, st in state.items():
        full[name] = {k: v for k, v in st.items()}
        if name.endswith("word_embeddings.weight"):
            full[name] = {k: (torch.cat([v, torch.zeros(104 - v.shape[0], *v.shape[1:])]) if v.ndim else v)
                          for k, v in st.items()}
    resumed = run_distributed(run_case, 1, batches=(3,), load_state=full, timeout=60)[0]
    _assert_params(resumed["params"][0], dp2[0]["params"][3], atol=0)
    _assert_params(resumed["params"][-1], dp2[0]["params"][4])


def test_pipeline_interleaved_tied_embedding_distopt_overlap():
    # The tied embedding lives on both end stages: its bucket must shard alike there, its norm count once.
    ref = run_distributed(run_pipeline_case, 1, timeout=60)[0]
    results = run_distributed(run_pipeline_case, 4, pp=2, dp=2, vpp_layers=1, dist_opt=True, overlap=True,
                              bucket_size=2000, timeout=120)
    assert ref["ok"] == [True] * 3 and all(r["ok"] == [True] * 3 for r in results)
    merged = {}
    for r in results:
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
        for name, w in r["params"].items():
            if name in merged:  # another replica, or the last stage's copy of the tied embedding
                torch.testing.assert_close(w, merged[name], atol=0, rtol=0, msg=name)
            merged[name] = w
    _assert_params(merged, ref["params"])


def test_expert_parallel_buffers_and_state():
    # EP=2 on DP=2: experts reduce over their own (trivial) expert-data-parallel group, dense params over
    # dp; the norm counts each expert shard once and the optimizer state gathers experts over EP.
    over = dict(num_layers=2, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)
    ref = run_distributed(run_pipeline_case, 1, over=over, timeout=60)[0]
    results = run_distributed(run_pipeline_case, 2, dp=2, ep=2, dist_opt=True, over=over, timeout=90)
    for r in results:
        assert r["buckets"] == 2  # one dense and one expert buffer
        assert r["ok"] == [True] * 3
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
        _assert_params(r["params"], ref["params"])
        assert set(r["state"]) == set(ref["state"])
        for name, want in ref["state"].items():
            for key in ("master", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(r["state"][name][key], want[key], atol=ATOL, rtol=1e-4,
                                           msg=f"{name} {key}")
