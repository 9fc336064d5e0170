"""The sim backend slows compute only: time a rank spends waiting on a peer inside a compute chunk
is not stretched (megahet/parallel/wait_clock.py, pipeline.compute_timer)."""
import time

import torch

from megahet.testing import run_distributed

WAIT_S = 2.0


def _chunk_with_a_slow_peer(world):
    from megahet.parallel.context import RankSpec, build_parallel_context
    from megahet.parallel.pipeline import compute_timer
    ctx = build_parallel_context(rank_specs=[RankSpec("sim", {"speed": 0.5}), RankSpec("cpu")], timeout_s=60)
    reported = []
    ctx.backend.after_compute = reported.append  # what the sim backend would stretch

    def chunk():
        x = torch.randn(64, 64, device=ctx.device)
        y = (x @ x).sum().reshape(1)  # a little compute
        if ctx.rank == 1:
            time.sleep(WAIT_S)  # the peer is late: rank 0 waits inside its chunk
        ctx.world_group.all_reduce(y)
        return y

    start = time.perf_counter()
    compute_timer(ctx.backend, chunk)()
    return ctx.backend.name, time.perf_counter() - start, reported[0]


def test_a_sim_rank_waiting_on_a_peer_is_not_slowed_further():
    (name, took, reported), _ = run_distributed(_chunk_with_a_slow_peer, 2, 2, timeout=120)
    assert name == "sim"
    assert took >= WAIT_S * 0.9          # it did wait for its peer inside the chunk...
    assert reported < WAIT_S / 2         # ...but only its compute is passed on to be stretched
