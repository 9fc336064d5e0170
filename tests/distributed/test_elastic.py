"""Elastic re-plan: a cpu + sim job loses its sim group, restarts on the cpu rank alone with the same
command line and --elastic, is re-planned, and continues the uninterrupted run's losses and data order."""
import os

from megahet.testing import run_distributed
from megahet.training.checkpoint_format import CheckpointReader
from tests.distributed.elastic_cases import discover_and_reduce
from tests.distributed.hetero_cases import cluster_text, plan_text
from tests.distributed.train_cases import losses, train

TOL = 2e-5  # as the plan-vs-single-process tests (tests/distributed/test_hetero.py): reduction order only


def test_losing_the_sim_group_replans_and_continues_the_same_run(tmp_path):
    cluster, plan = tmp_path / "cluster.yaml", tmp_path / "plan.yaml"
    cluster.write_text(cluster_text(("fast", "cpu", 1), ("slow", "sim", 1)))
    plan.write_text(plan_text([4], [(2, 2, [("fast", 1)]), (2, 2, [("slow", 1)])]))  # two replicas, 4 + 4 samples
    ck = str(tmp_path / "ck")
    job = dict(cluster=str(cluster), plan=str(plan), elastic=True, train_iters=6, save_interval=3)
    # Uninterrupted: both groups (elastic is a no-op when every rank is there).
    full = run_distributed(train, 2, {**job, "save": ck, "metrics_file": str(tmp_path / "full.jsonl")},
                           timeout=240)[0]
    with open(os.path.join(ck, "latest"), "w") as fh:
        fh.write("iter_0000003")  # the sim group is lost after iteration 3's checkpoint
    after = run_distributed(train, 1, {**job, "load": ck, "save": str(tmp_path / "ck2"),
                                       "metrics_file": str(tmp_path / "after.jsonl")}, timeout=240)[0]
    assert [r["iteration"] for r in after] == [4, 5, 6]
    assert [r["consumed_samples"] for r in after] == [r["consumed_samples"] for r in full[3:]] == [32, 40, 48]
    ref = losses(full)[3:]
    assert len(losses(after)) == 3 and all(abs(a - b) < TOL * abs(b) for a, b in zip(losses(after), ref)), \
        (losses(after), ref)
    assert after[-1]["replica_samples"] == [8]  # one replica takes the whole global batch
    meta = CheckpointReader(str(tmp_path / "ck2")).meta
    assert meta["cluster"]["groups"] == [{"name": "fast", "backend": "cpu", "devices": 1}]
    assert [[s["group"] for s in p["stages"]] for p in meta["plan"]["pipelines"]] == [["fast"]]
    assert CheckpointReader(ck).meta["cluster"]["groups"][1]["name"] == "slow"  # the job's spec, recorded


def test_ranks_agree_on_the_surviving_groups_through_the_store(tmp_path):
    """Two of three ranks are back, in another order than the spec lists their groups."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(cluster_text(("fast", "cpu", 1), ("slow", "sim", 2)))
    res = run_distributed(discover_and_reduce, 2, ["slow", "fast"], str(cluster), timeout=90)
    for r in res:
        assert [(g["name"], g["devices"]) for g in r["cluster"]["groups"]] == [("slow", 1), ("fast", 1)]
        assert r["lost"] == ["'slow' (1 of 2 devices)"] and r["sum"] == 3.0
    assert [r["backend"] for r in res] == ["sim", "cpu"]
