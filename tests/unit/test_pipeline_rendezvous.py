"""The real schedule executor over every schedule with NCCL-like (rendezvous) point-to-point.

Each pipeline rank is a thread; `megahet.testing_p2p.RendezvousNetwork` makes a send wait until the
matching receive is posted and matches messages per rank pair in posting order, as NCCL and HCCL do.
A deadlock fails within the network timeout instead of hanging; every run must also give the
sequential model's gradients. Stages are uneven: different widths (so every boundary has its own
activation shape) and different numbers of layers.
"""
import threading
from dataclasses import replace

import pytest
import torch

from megahet.parallel.schedule_executor import execute_schedule
from megahet.parallel.schedules import build_schedule
from megahet.testing_p2p import RendezvousNetwork

BATCH = 2


@pytest.fixture(autouse=True)
def one_thread_per_rank():
    # Tiny ops on up to 8 rank threads: intra-op parallelism only adds contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_stages(n_stages):
    """Stage s maps width 3 + s % 4 to the next width through 1 + s % 3 linear layers."""
    torch.manual_seed(0)
    widths = [3 + s % 4 for s in range(n_stages + 1)]
    return [torch.nn.Sequential(*[torch.nn.Linear(widths[s] if i == 0 else widths[s + 1], widths[s + 1]).double()
                                  for i in range(1 + s % 3)]) for s in range(n_stages)], widths


def sequential_grads(n_stages, data):
    stages, _ = make_stages(n_stages)
    for x in data:
        for stage in stages:
            x = stage(torch.tanh(x))
        (x ** 2).sum().backward()
    return [p.grad.clone() for stage in stages for p in stage.parameters()]


def run(name, pp, m, chunks, timeout=5.0, schedule=None):
    n_stages = pp * chunks
    stages, widths = make_stages(n_stages)
    torch.manual_seed(1)
    data = [torch.randn(BATCH, widths[0], dtype=torch.double) for _ in range(m)]
    schedule = schedule or build_schedule(name, pp, m, chunks)
    network, errors = RendezvousNetwork(pp, timeout=timeout), []

    def rank_main(rank):
        def forward_step(chunk, mb, inp):
            stage = chunk * pp + rank
            out = stages[stage](torch.tanh(data[mb] if inp is None else inp))  # [b, widths[stage + 1]]
            return (out ** 2).sum() if stage == n_stages - 1 else out

        def backward_step(chunk, mb, inp, out, out_grad):
            torch.autograd.backward(out, grad_tensors=out_grad)
            return None if inp is None else inp.grad

        try:
            execute_schedule(schedule[rank], forward_step=forward_step, backward_step=backward_step,
                             p2p=network.endpoint(rank))
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(pp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout * 4 + 30)
    assert not any(t.is_alive() for t in threads), f"{name} pp={pp} m={m}: ranks still running"
    if errors:
        raise AssertionError(f"{name} pp={pp} m={m} chunks={chunks}: {errors[0]}") from errors[0]
    assert not network.unmatched(), network.unmatched()
    got = [p.grad for stage in stages for p in stage.parameters()]
    for g, e in zip(got, sequential_grads(n_stages, data)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-9)


CASES = [(name, pp, chunks) for pp in (2, 3, 4, 8)
         for name, chunks in (("afab", 1), ("afab", 2), ("1f1b", 1), ("interleaved", 2))]


@pytest.mark.parametrize("name, pp, chunks", CASES)
def test_every_schedule_completes_under_rendezvous_sends(name, pp, chunks):
    for m in range(1, 3 * pp + 1):
        if name == "1f1b" and m < pp or name == "interleaved" and m % pp:
            continue  # refused by the schedule builders with a clear error
        run(name, pp, m, chunks)


def test_interleaved_three_chunks():
    run("interleaved", 2, 4, 3)
    run("interleaved", 4, 8, 3)


def test_stand_in_reports_a_deadlock():
    # Two ranks that both send first: fine on buffered gloo, a deadlock on NCCL.
    network, errors = RendezvousNetwork(2, timeout=0.5), []

    def rank_main(rank):
        ep = network.endpoint(rank)
        try:
            ep.isend(torch.ones(2), 1 - rank, tag=0)
            ep.recv(1 - rank, tag=0)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert len(errors) == 2 and all("deadlock" in str(e) for e in errors)
    assert "rank 0 waits on batch of send(tag 0, 0->1)" in str(errors[0])


def test_stand_in_rejects_out_of_order_matching():
    # Rank 0 sends tag 1 then tag 2 in one batch; rank 1 receives tag 2 first.
    network, errors, got = RendezvousNetwork(2, timeout=2), [], []

    def sender():
        try:
            network.endpoint(0).exchange([(torch.ones(1), 1, 1), (torch.zeros(1), 1, 2)], [])
        except Exception as exc:
            errors.append(exc)

    def receiver():
        try:
            got.extend(network.endpoint(1).exchange([], [(0, 2), (0, 1)]))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert errors and "would deliver the wrong tensor" in str(errors[0]) and not got


def test_stand_in_needs_aligned_batches():
    # AFAB with the last forward's send and the first backward's receive in one batch: rank 0 waits
    # for a header rank 1 sends only after it has received that forward's data.
    schedule = build_schedule("afab", 2, 2)
    merged = [replace(a, new_batch=False) for a in schedule[0]]
    with pytest.raises(AssertionError, match="deadlock"):
        run("afab", 2, 2, 1, timeout=1.0, schedule=[merged, schedule[1]])
