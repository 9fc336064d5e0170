"""Expert parallelism (EP=2, EP=4, EP=2 x TP=2 with and without sequence parallelism, both dispatchers,
dropless and with capacity) gives the single-rank model's per-token losses, full gradients, router
statistics and expert-bias updates; EP across communication domains is refused."""
import pytest
import torch

from megahet.testing import run_distributed
from tests.distributed.moe_cases import build_ep_across_domains, run_moe, tracker_across_stages

DROPLESS = [{"moe_token_dispatcher_type": "alltoall"}, {"moe_token_dispatcher_type": "allgather"}]
CAPACITY = {"moe_token_dispatcher_type": "alltoall", "moe_expert_capacity_factor": 1.0}


@pytest.fixture(scope="module")
def reference():
    """One rank, every shard as a micro-batch: [alltoall, allgather, capacity]."""
    return run_distributed(run_moe, 1, 1, variants=DROPLESS + [CAPACITY], timeout=60)[0]


def _merge_losses(ranks):
    out = {}
    for r in ranks:
        out.update(r["losses"])
    return out


def _compare(ref, ranks, atol=1e-5):
    got = _merge_losses(ranks)
    assert sorted(got) == sorted(ref["losses"])
    for shard in ref["losses"]:
        torch.testing.assert_close(got[shard], ref["losses"][shard], atol=atol, rtol=1e-5)
    rank0 = ranks[0]
    assert set(rank0["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(rank0["grads"][name], g, atol=atol, rtol=1e-4, msg=name)
    for name, b in ref["biases"].items():
        torch.testing.assert_close(rank0["biases"][name], b, atol=0, rtol=0, msg=name)
    for r in ranks:  # every rank logs the same, job-wide statistics
        for key, value in ref["report"].items():
            if isinstance(value, list):
                assert r["report"][key] == value, key
            else:
                assert r["report"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_reference_is_meaningful(reference):
    alltoall, allgather, capacity = reference
    _compare(alltoall, [allgather], atol=1e-6)  # the two dispatchers agree on one rank
    report = alltoall["report"]
    assert sum(report["moe/layer_0/tokens_per_expert"]) == 4 * 2 * 8 * 2  # shards x b x s x topk
    assert any(float(b.abs().sum()) > 0 for b in alltoall["biases"].values())
    assert not torch.allclose(capacity["losses"][0], alltoall["losses"][0])  # tokens were dropped


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_matches_single_rank(reference, ep):
    runs = run_distributed(run_moe, ep, ep, variants=DROPLESS, timeout=90)
    for v in range(len(DROPLESS)):
        ranks = [r[v] for r in runs]
        _compare(reference[v], ranks)
        shape, is_expert = ranks[0]["shapes"]["decoder.layers.0.mlp.experts.linear_fc1.weight"]
        assert is_expert and shape == (8 // ep, 32, 2 * 16)  # this rank holds E/ep experts


def test_expert_parallel_with_capacity_matches_single_rank(reference):
    runs = run_distributed(run_moe, 2, 2, variants=[CAPACITY], timeout=90)
    _compare(reference[2], [r[0] for r in runs])


@pytest.mark.parametrize("sp,dispatcher", [(True, 0), (False, 1)])
def test_expert_and_tensor_parallel_match_single_rank(reference, sp, dispatcher):
    runs = run_distributed(run_moe, 4, 2, 2, sp, variants=[DROPLESS[dispatcher]], timeout=90)
    _compare(reference[dispatcher], [r[0] for r in runs])
    shape, _ = runs[0][0]["shapes"]["decoder.layers.0.mlp.experts.linear_fc2.weight"]
    assert shape == (4, 8, 32)  # E/ep experts, ffn/tp rows


def test_expert_parallel_across_domains_is_refused():
    errors = run_distributed(build_ep_across_domains, 2, timeout=60)
    assert all(e is not None and "expert-parallel group" in e and "--expert-model-parallel-size" in e
               for e in errors)


def test_tracker_report_covers_every_pipeline_stage():
    reports = run_distributed(tracker_across_stages, 2, timeout=60)
    assert reports[0] == reports[1]
    r = reports[0]
    assert r["moe/layer_0/tokens_per_expert"] == [1, 2, 3, 4] and r["moe/layer_2/tokens_per_expert"] == [3, 6, 9, 12]
    assert r["moe/layer_0/aux_loss"] == pytest.approx(0.5) and r["moe/layer_2/aux_loss"] == pytest.approx(1.5)
    assert r["moe_aux_loss"] == pytest.approx(1.0) and r["moe_z_loss"] == pytest.approx(1.5)
    assert r["moe/layer_2/load_imbalance"] == pytest.approx(12 / 7.5)
