"""Pipeline schedules as data: orders, communication pairing, deadlock checks (no processes)."""
from dataclasses import replace

import pytest

from megahet.errors import MegahetError
from megahet.parallel.schedule_trace import TraceEvent, bubble_fraction, theoretical_bubble
from megahet.parallel.schedules import (Action, _with_comm, align_batches, build_schedule, comm_batches, format_schedule, interleaved_one_f_one_b,
                                        one_f_one_b, simulate_schedule, validate_schedule)


def compute_order(actions):
    return [str(a) for a in actions if a.is_compute]


CASES = [(name, pp, m, chunks)
         for pp in (1, 2, 4)
         for m in (1, 2, 3, 4, 5, 8, 12)
         for name, chunks in (("afab", 1), ("afab", 2), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3))
         if not (name == "1f1b" and m < pp)
         and not (name == "interleaved" and (m % pp or pp == 1))
         and not (name == "afab" and chunks > 1 and pp == 1)]


@pytest.mark.parametrize("name, pp, m, chunks", CASES)
def test_every_schedule_validates(name, pp, m, chunks):
    schedule = build_schedule(name, pp, m, chunks)
    assert len(schedule) == pp
    validate_schedule(schedule, pp, chunks)
    for actions in schedule:
        assert sum(a.op == "fwd" for a in actions) == m * chunks
        assert sum(a.op == "bwd" for a in actions) == m * chunks


def test_single_stage_has_no_communication():
    [actions] = build_schedule("1f1b", 1, 3)
    assert [str(a) for a in actions] == ["F0c0", "B0c0", "F1c0", "B1c0", "F2c0", "B2c0"]


@pytest.mark.parametrize("pp, m", [(2, 2), (2, 5), (4, 4), (4, 8), (4, 13)])
def test_1f1b_in_flight_bounded(pp, m):
    for rank, actions in enumerate(one_f_one_b(pp, m)):
        in_flight, peak = 0, 0
        for a in actions:
            in_flight += {"fwd": 1, "bwd": -1}.get(a.op, 0)
            peak = max(peak, in_flight)
        assert peak == pp - rank


def test_1f1b_first_rank_matches_megatron():
    expected = (["F0c0", "F1c0", "F2c0"]
                + ["F3c0", "B0c0", "F4c0", "B1c0", "F5c0", "B2c0", "F6c0", "B3c0", "F7c0", "B4c0"]
                + ["B5c0", "B6c0", "B7c0"])
    assert compute_order(one_f_one_b(4, 8)[0]) == expected


def test_1f1b_last_rank_alternates_with_no_loss_comm():
    last = one_f_one_b(4, 4)[3]
    assert compute_order(last) == ["F0c0", "B0c0", "F1c0", "B1c0", "F2c0", "B2c0", "F3c0", "B3c0"]
    assert not any(a.op in ("send_fwd", "recv_bwd") for a in last)
    assert Action("recv_fwd", 0, 0, peer=2, peer_chunk=0) in last
    assert Action("send_bwd", 0, 0, peer=2, peer_chunk=0) in last


def test_interleaved_first_rank_matches_megatron():
    # pp=2, m=4, chunks=2: warm-up = (2-0-1)*2 + (2-1)*2 = 4 forwards; groups of pp=2 micro-batches
    # per chunk; backward runs chunks in reverse.
    expected = ["F0c0", "F1c0", "F0c1", "F1c1",
                "F2c0", "B0c1", "F3c0", "B1c1", "F2c1", "B0c0", "F3c1", "B1c0",
                "B2c1", "B3c1", "B2c0", "B3c0"]
    assert compute_order(interleaved_one_f_one_b(2, 4, 2)[0]) == expected


def test_interleaved_wraps_between_last_and_first_rank():
    rank0, rank1 = interleaved_one_f_one_b(2, 4, 2)
    assert Action("send_fwd", 0, 1, peer=0, peer_chunk=1) in rank1     # rank 1 chunk 0 -> rank 0 chunk 1
    assert Action("recv_fwd", 1, 1, peer=1, peer_chunk=0) in rank0
    assert Action("send_bwd", 1, 2, peer=1, peer_chunk=0) in rank0     # grads go back the same way
    assert not any(a.op == "recv_fwd" and a.chunk == 0 for a in rank0)  # first stage reads data
    assert not any(a.op in ("send_fwd", "recv_bwd") and a.chunk == 1 for a in rank1)  # loss stage


def test_action_str_is_compact():
    assert str(Action("fwd", 1, 3)) == "F3c1"
    assert str(Action("send_bwd", 0, 2, peer=1, peer_chunk=0)) == "SB2c0>1"
    assert str(Action("recv_fwd", 1, 0, peer=3, peer_chunk=0)) == "RF0c1<3"
    with pytest.raises(MegahetError, match="unknown pipeline action"):
        Action("forward", 0, 0)
    with pytest.raises(MegahetError, match="peer and peer_chunk"):
        Action("send_fwd", 0, 0)


def test_1f1b_needs_enough_microbatches():
    with pytest.raises(MegahetError, match=r"--global-batch-size.*--micro-batch-size.*"
                                           r"--pipeline-model-parallel-size 4"):
        one_f_one_b(4, 3)


def test_interleaved_needs_multiple_of_pp():
    with pytest.raises(MegahetError, match=r"multiple of --pipeline-model-parallel-size 4"):
        interleaved_one_f_one_b(4, 6, 2)


def test_build_schedule_rejects_bad_names_and_chunks():
    with pytest.raises(MegahetError, match="unknown pipeline schedule 'gpipe'"):
        build_schedule("gpipe", 2, 4)
    with pytest.raises(MegahetError, match="interleaved"):
        build_schedule("1f1b", 2, 4, num_chunks=2)
    with pytest.raises(MegahetError, match="--pipeline-model-parallel-size > 1"):
        build_schedule("interleaved", 1, 4, num_chunks=2)


def test_validate_rejects_missing_and_misordered_compute():
    schedule = one_f_one_b(2, 2)
    broken = [schedule[0], [a for a in schedule[1] if str(a) != "B1c0"]]
    with pytest.raises(MegahetError, match="rank 1: action B1c0 is missing"):
        validate_schedule(broken, 2, 1)
    [single] = one_f_one_b(1, 2)
    with pytest.raises(MegahetError, match="B0c0 comes before its forward"):
        validate_schedule([[single[1], single[0], *single[2:]]], 1, 1)


def test_validate_rejects_wrong_peer():
    schedule = one_f_one_b(2, 2)
    wrong = Action("send_fwd", 0, 0, peer=0, peer_chunk=0)
    broken = [[wrong if a.op == "send_fwd" and a.microbatch == 0 else a for a in schedule[0]], schedule[1]]
    with pytest.raises(MegahetError, match="rank 0: action"):
        validate_schedule(broken, 2, 1)


def test_validate_rejects_receive_after_compute():
    rank0, rank1 = one_f_one_b(2, 2)
    i = next(i for i, a in enumerate(rank1) if a.op == "recv_fwd")
    swapped = rank1[:i] + [rank1[i + 1], rank1[i]] + rank1[i + 2:]
    with pytest.raises(MegahetError, match="comes after its compute"):
        validate_schedule([rank0, swapped], 2, 1)


def test_validate_detects_deadlock():
    # Rank 0 runs B0 before F1, rank 1 runs all forwards first: each waits on the other.
    rank0, rank1 = build_schedule("afab", 2, 2)
    by_name = {str(a): a for a in rank0}
    reordered = [by_name[n] for n in ("F0c0", "SF0c0>1", "RB0c0<1", "B0c0", "F1c0", "SF1c0>1", "RB1c0<1", "B1c0")]
    with pytest.raises(MegahetError, match=r"deadlocks under rendezvous sends: rank 0 at RB0c0<1; "
                                           r"rank 1 at RF1c0<0"):
        validate_schedule([reordered, rank1], 2, 1)


def test_validate_models_unbuffered_sends():
    # Interleaved 1F1B with each step's send posted on its own (the old placement) completes when sends
    # are buffered, but under rendezvous rank 0's forward send waits on rank 1, which waits to send back.
    compute = [[(a.op, a.chunk, a.microbatch) for a in actions if a.is_compute]
               for actions in interleaved_one_f_one_b(2, 4, 2)]
    old = [_with_comm(rank, steps, 2, 2) for rank, steps in enumerate(compute)]
    with pytest.raises(MegahetError, match="deadlocks under rendezvous sends"):
        validate_schedule(align_batches(old), 2, 2)
    simulate_schedule(old, buffered=True)  # the old model: buffered sends hid it


def test_validate_models_the_shape_header():
    # AFAB pp=2: rank 0 batching the last forward's send with the first backward's receive must first
    # take B0's shape header, which rank 1 sends only after it has received F3's data: a deadlock.
    schedule = build_schedule("afab", 2, 4)
    merged = [replace(a, new_batch=False) for a in schedule[0]]
    with pytest.raises(MegahetError, match=r"deadlocks under rendezvous sends: rank 0 at SF3c0>1 RB0c0<1"):
        validate_schedule([merged, schedule[1]], 2, 1)
    simulate_schedule([merged, schedule[1]], buffered=True)  # gloo-like buffering would hide it
    assert sum(a.new_batch for a in schedule[0]) == 1  # align_batches split exactly that batch


def test_validate_rejects_messages_matched_out_of_order():
    # Rank 0 sends micro-batch 0 first, rank 1 receives micro-batch 1 first: NCCL would hand
    # micro-batch 0's tensor to micro-batch 1's receive.
    rank0 = [Action("fwd", 0, 0), Action("send_fwd", 0, 0, 1, 0), Action("fwd", 0, 1), Action("send_fwd", 0, 1, 1, 0),
             Action("recv_bwd", 0, 1, 1, 0), Action("bwd", 0, 1), Action("recv_bwd", 0, 0, 1, 0), Action("bwd", 0, 0)]
    rank1 = [Action("recv_fwd", 0, 1, 0, 0), Action("fwd", 0, 1), Action("bwd", 0, 1), Action("send_bwd", 0, 1, 0, 0),
             Action("recv_fwd", 0, 0, 0, 0), Action("fwd", 0, 0), Action("bwd", 0, 0), Action("send_bwd", 0, 0, 0, 0)]
    with pytest.raises(MegahetError, match="from rank 0 to rank 1 match out of order"):
        validate_schedule([rank0, rank1], 2, 1)


def test_comm_batches_group_and_sort():
    rank0 = interleaved_one_f_one_b(2, 4, 2)[0]
    batches = [item for item in comm_batches(rank0) if isinstance(item, tuple)]
    assert sum(len(b) for b in batches) == sum(not a.is_compute for a in rank0)
    steady = next(b for b in batches if len(b) == 4)
    assert sorted(a.op for a in steady[:2]) == ["send_bwd", "send_fwd"]   # one peer: sends first,
    assert sorted(a.op for a in steady[2:]) == ["recv_bwd", "recv_fwd"]   # then receives
    assert [a.microbatch for a in steady[:2]] == sorted(a.microbatch for a in steady[:2])


def test_format_schedule_aligned_grid():
    text = format_schedule(one_f_one_b(2, 2))
    assert text.splitlines() == ["rank 0 | F0c0 F1c0 .    B0c0 .    B1c0",
                                 "rank 1 | .    F0c0 B0c0 F1c0 B1c0 ."]
    flat = format_schedule(one_f_one_b(2, 2), aligned=False).splitlines()
    assert flat[0].startswith("rank 0: F0c0 SF0c0>1 F1c0 SF1c0>1 RB0c0<1 B0c0")


@pytest.mark.parametrize("name, pp, m, chunks", [("1f1b", 4, 8, 1), ("1f1b", 2, 5, 1), ("interleaved", 4, 8, 2),
                                                 ("interleaved", 2, 4, 2), ("interleaved", 4, 12, 3)])
def test_simulated_bubble_matches_theory(name, pp, m, chunks):
    timeline = simulate_schedule(build_schedule(name, pp, m, chunks))
    events = [[TraceEvent(str(a), a.op, s, e) for a, s, e in row] for row in timeline]
    assert bubble_fraction(events) == pytest.approx(theoretical_bubble(pp, m, chunks))
