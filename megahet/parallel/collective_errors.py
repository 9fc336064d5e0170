"""Turn a failed or timed-out collective into a one-line error naming this rank, the collective and the group.

A rank that hangs or dies makes its peers' collectives fail after the process-group timeout with a
library message (gloo: "Timed out waiting 60000ms for recv operation", "Connection closed by peer")
that says neither which collective nor which group. `named_failures` wraps a CommGroup's collectives
(and the Work handles of async ones) so the error says both, which peers never arrived and where they
are (heartbeat.Progress, when the group has one), and how to proceed. `wait_all` does the same for
point-to-point waits (pipeline links, hierarchical exchanges).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch.distributed as dist

from megahet.errors import MegahetError

COLLECTIVES = ("all_reduce", "reduce_scatter_into", "all_gather_into", "all_gather_ints", "all_to_all",
               "broadcast", "barrier")
_BROKEN = (RuntimeError, getattr(dist, "DistBackendError", RuntimeError))
_PEER_GONE = ("timed out", "timeout", "connection", "closed", "reset by peer", "broken pipe", "socket")


def peer_failure(exc: BaseException) -> bool:
    """Whether a collective's exception means a peer hung or died (not a bug in the call)."""
    return not isinstance(exc, MegahetError) and any(w in str(exc).lower() for w in _PEER_GONE)


def describe(exc: BaseException, what: str, peers: Optional[str] = None) -> MegahetError:
    """The one-line error; `peers`: which ranks never arrived and where they are (heartbeat.py)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    kind = "timed out" if "timed out" in text.lower() or "timeout" in text.lower() else "failed"
    who = peers or "a peer rank is hung or has died"
    return MegahetError(f"{what} {kind} ({text[:200]}): {who}; check the other ranks' logs (or raise "
                        f"--distributed-timeout-s if they are just slow) and resume from the last checkpoint")


def _explain(progress, peers: Sequence[int], group: Optional[str] = None, seq: Optional[int] = None) -> Optional[str]:
    if progress is None:
        return None
    try:
        return progress.explain(list(peers), group, seq)
    except Exception:  # noqa: BLE001 - the error must still be raised, naming what it can
        return None


def wait_all(works, what: str, progress=None, peers: Sequence[int] = ()) -> None:
    """Wait for point-to-point Work handles; a hung or dead peer becomes the one-line error naming
    `what` (e.g. "rank 3: pipeline exchange with ranks [2, 4]") and the peers' states."""
    try:
        for w in works:
            w.wait()
    except _BROKEN as exc:
        if not peer_failure(exc):
            raise
        raise describe(exc, what, _explain(progress, peers)) from None


def _wrap_work(work, what: str, explain=None):
    if work is None or not hasattr(work, "wait"):
        return work
    wait = work.wait

    @functools.wraps(wait)
    def checked_wait(*args, **kwargs):
        try:
            return wait(*args, **kwargs)
        except _BROKEN as exc:
            if not peer_failure(exc):
                raise
            raise describe(exc, what, explain() if explain else None) from None
    work.wait = checked_wait
    return work


def named_failures(cls):
    """Class decorator for CommGroup: wrap every collective method (see COLLECTIVES)."""
    for name in COLLECTIVES:
        method = getattr(cls, name, None)
        if method is None:
            continue

        def make(method, name):
            @functools.wraps(method)
            def call(self, *args, **kwargs):
                me = self.ranks[self.rank] if self.rank >= 0 else None
                what = f"rank {'?' if me is None else me}: collective {name} over {self.name}"
                progress = getattr(self, "progress", None)  # heartbeat.Progress (set by the context)
                seq = progress.enter(self.name, f"{name} over {self.name}") if progress is not None else None

                def explain():  # only on failure: reads the peers' heartbeats
                    return _explain(progress, [r for r in self.ranks if r != me], self.name, seq)
                try:
                    out = method(self, *args, **kwargs)
                except _BROKEN as exc:
                    if not peer_failure(exc):
                        raise
                    raise describe(exc, what, explain()) from None
                return _wrap_work(out, what, explain) if kwargs.get("async_op") else out
            return call
        setattr(cls, name, make(method, name))
    return cls
