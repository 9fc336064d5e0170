"""Fault injection: a hung rank, NaN bursts. (Damaged shards and full disks: tests/unit/test_checkpoint_format.py;
killed ranks: tests/e2e/test_restart.py.)"""
from megahet.testing import run_distributed
from tests.distributed.ckpt_cases import hang_in_all_reduce, hang_in_bridged_exchanges


def test_a_hung_rank_gives_a_one_line_error_naming_rank_and_collective():
    msg = run_distributed(hang_in_all_reduce, 2, timeout=60)[0]
    assert msg.startswith("rank 0: collective all_reduce over world timed out"), msg
    assert "never arrived: rank 1 (last heartbeat: in step 7, last entered all_reduce over world);" in msg, msg
    assert "\n" not in msg
    assert "dead or stopped" not in msg  # its heartbeat goes on: alive, stuck elsewhere


def test_a_stopped_rank_is_named_as_dead_or_stopped():
    msg = run_distributed(hang_in_all_reduce, 2, True, timeout=60)[0]
    assert ("never arrived: rank 1 (last heartbeat: in step 7, last entered all_reduce over world; none for "
            in msg), msg
    assert "dead or stopped" in msg and "\n" not in msg


def test_hangs_in_hierarchical_reductions_and_pipeline_links_name_the_rank():
    res = run_distributed(hang_in_bridged_exchanges, 3, timeout=90)
    for rank in (0, 1):
        assert res[rank][0].startswith(f"rank {rank}: collective all_reduce over dp[0, 1, 2] timed out"), res[rank]
        assert "never arrived: rank 2 (last heartbeat: before the first step" in res[rank][0], res[rank]
    assert res[1][1].startswith("rank 1: point-to-point exchange with ranks [2] timed out"), res[1]
    assert "rank 2 (last heartbeat: before the first step" in res[1][1] and all("\n" not in m for m in res[0] + res[1])


def test_nan_burst_skips_steps_and_checkpoints_stay_exact(tmp_path):
    """fp16 with a far too large initial loss scale: the first steps overflow (Inf/NaN grads), are
    skipped and the scale backs off; checkpoints saved during the burst are complete and resume exactly."""
    from megahet.training.checkpoint import verify_checkpoint
    from megahet.parallel.context import single_process_context
    from tests.distributed.train_cases import losses, train
    import os
    burst = dict(fp16=True, initial_loss_scale=2.0 ** 22, max_skipped_steps=30, train_iters=8)
    ck = str(tmp_path / "ck")
    straight = run_distributed(train, 1, {**burst, "metrics_file": str(tmp_path / "a.jsonl"), "save": ck,
                                          "save_interval": 2}, timeout=180)[0]
    assert straight[1]["skipped_iters"] >= 2 and straight[-1]["skipped_iters"] < 8, straight  # a burst, then training
    ctx = single_process_context("cpu")
    for name in sorted(os.listdir(ck)):
        if name.startswith("iter_"):
            assert verify_checkpoint(os.path.join(ck, name), ctx) is None
    with open(os.path.join(ck, "latest"), "w") as fh:
        fh.write("iter_0000002")  # resume from inside the burst
    resumed = run_distributed(train, 1, {**burst, "metrics_file": str(tmp_path / "b.jsonl"), "load": ck}, timeout=180)[0]
    assert losses(resumed) == losses(straight)[2:]
    assert [r["skipped_iters"] for r in resumed] == [r["skipped_iters"] for r in straight[2:]]
