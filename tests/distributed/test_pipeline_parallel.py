"""Pipeline layouts (uneven stages, interleaved, with TP and DP, recompute) match one process."""
import pytest
import torch

from megahet.testing import run_distributed
from tests.distributed.pp_cases import run_pipeline


@pytest.fixture(scope="module")
def reference():
    return run_distributed(run_pipeline, 1, 1, {}, "afab", timeout=60)[0]


def _merge(results):
    loss = results[0][0]
    grads = {}
    for _, g in results:
        for name, t in g.items():
            if name in grads:  # tied embedding on first and last stage: both copies must agree
                torch.testing.assert_close(grads[name], t, atol=1e-6, rtol=1e-5)
            grads[name] = t
    return loss, grads


def _check(reference, results, atol=2e-6):
    ref_loss, ref_grads = reference
    loss, grads = _merge(results)
    assert abs(loss - ref_loss) < 1e-4 * abs(ref_loss)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("world,over,schedule", [
    (2, dict(pipeline_model_parallel_size=2), "1f1b"),
    (2, dict(pipeline_model_parallel_size=2, pipeline_layers=[3, 1]), "1f1b"),
    (4, dict(pipeline_model_parallel_size=4, num_layers=6, pipeline_layers=[1, 2, 2, 1]), "1f1b"),
    (2, dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1), "interleaved"),
    (2, dict(pipeline_model_parallel_size=2, recompute_granularity="full"), "afab"),
    (2, dict(pipeline_model_parallel_size=2, recompute_granularity="full", recompute_num_layers=2), "1f1b"),
    (2, dict(pipeline_model_parallel_size=2, recompute_granularity="full", recompute_method="block"), "1f1b"),
    (2, dict(pipeline_model_parallel_size=2, recompute_granularity="selective"), "1f1b"),
])
def test_pipeline_matches_single_process(world, over, schedule):
    num_layers = over.get("num_layers", 4)
    ref = run_distributed(run_pipeline, 1, 1, {"num_layers": num_layers}, "afab", timeout=60)[0]
    _check(ref, run_distributed(run_pipeline, world, world, over, schedule, timeout=90))


def test_tp2_pp2_dp2_matches_single_process(reference):
    over = dict(pipeline_model_parallel_size=2, tensor_model_parallel_size=2, sequence_parallel=True)
    _check(reference, run_distributed(run_pipeline, 8, 8, over, "1f1b", timeout=150), atol=5e-6)


def test_shapes_may_change_between_steps():
    from tests.distributed.pp_cases import run_varying_shapes
    ref = run_distributed(run_varying_shapes, 1, 1, timeout=60)[0]
    got = run_distributed(run_varying_shapes, 2, 2, timeout=60)[0]
    assert got == pytest.approx(ref, rel=1e-5)
