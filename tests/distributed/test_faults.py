"""Fault injection: a hung rank, NaN bursts. (Damaged shards and full disks: tests/unit/test_checkpoint_format.py;
killed ranks: tests/e2e/test_restart.py.)"""
from megahet.testing import run_distributed
from tests.distributed.ckpt_cases import hang_in_all_reduce


def test_a_hung_rank_gives_a_one_line_error_naming_rank_and_collective():
    msg = run_distributed(hang_in_all_reduce, 2, timeout=60)[0]
    assert msg.startswith("rank 0: collective all_reduce over world timed out"), msg
    assert "a peer rank is hung or has died" in msg and "\n" not in msg


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
