"""One helper to run a function on N gloo ranks in fresh processes, with a hard timeout.

Used by every distributed test and by benchmarks. Ranks are started from a forkserver that has
imported torch once (fast starts), get the torchrun environment variables, and return their
result (anything picklable) to the parent. A rank that raises fails the call with its traceback;
a hung collective fails after `timeout` seconds; every child is killed on the way out.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "megahet.parallel.context"])
    return _CTX


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, env, args, kwargs, results):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)})
    # Started from a torchrun rank (auto-planning's measurements), the children are their own world: with
    # torchrun's agent-store flag inherited, init_process_group would wait for an agent's store that
    # is not at this port instead of serving one.
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    os.environ.update(env)
    try:
        import torch
        torch.set_num_threads(int(env.get("MEGAHET_TEST_THREADS", "1")))
        out = fn(*args, **kwargs)
        # Plain pickle bytes: torch's queue pickler would share tensors by fd, which dies with the child.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


class DistributedTestError(RuntimeError):
    pass


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 120.0,
                    env: Optional[Dict[str, str]] = None, **kwargs) -> List[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` ranks; return the per-rank results in rank order.

    `fn` must be importable (a module-level function). Raises DistributedTestError with the failing
    rank's traceback, or on timeout.
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, dict(env or {}), args, kwargs, results),
                         daemon=True) for r in range(world_size)]
    out: Dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DistributedTestError(f"timed out after {timeout:.0f}s waiting for ranks "
                                           f"{sorted(set(range(world_size)) - set(out))} (hung collective?)")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in out]
                if dead:
                    time.sleep(0.5)  # let a dying rank's report arrive
                    if results.empty():
                        raise DistributedTestError(f"rank(s) {dead} exited without a result "
                                                   f"(exit codes {[procs[i].exitcode for i in dead]})")
                continue
            if not ok:
                raise DistributedTestError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
        return [out[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=5 if len(out) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
