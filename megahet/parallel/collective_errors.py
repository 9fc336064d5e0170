"""Turn a failed or timed-out collective into a one-line error naming this rank, the collective and the group.

A rank that hangs or dies makes its peers' collectives fail after the process-group timeout with a
library message (gloo: "Timed out waiting 60000ms for recv operation", "Connection closed by peer")
that says neither which collective nor which group. `named_failures` wraps a CommGroup's collectives
(and the Work handles of async ones) so the error says both, and how to proceed.
"""
from __future__ import annotations

import functools

import torch.distributed as dist

from megahet.errors import MegahetError

COLLECTIVES = ("all_reduce", "reduce_scatter_into", "all_gather_into", "all_gather_ints", "all_to_all",
               "broadcast", "barrier")
_BROKEN = (RuntimeError, getattr(dist, "DistBackendError", RuntimeError))
_PEER_GONE = ("timed out", "timeout", "connection", "closed", "reset by peer", "broken pipe", "socket")


def peer_failure(exc: BaseException) -> bool:
    """Whether a collective's exception means a peer hung or died (not a bug in the call)."""
    return not isinstance(exc, MegahetError) and any(w in str(exc).lower() for w in _PEER_GONE)


def describe(exc: BaseException, what: str) -> MegahetError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    kind = "timed out" if "timed out" in text.lower() or "timeout" in text.lower() else "failed"
    return MegahetError(f"{what} {kind} ({text[:200]}): a peer rank is hung or has died; check the other ranks' "
                        f"logs (or raise --distributed-timeout-s if they are just slow) and resume from the last checkpoint")


def _wrap_work(work, what: str):
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
            raise describe(exc, what) from None
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
                what = f"rank {self.ranks[self.rank] if self.rank >= 0 else '?'}: collective {name} over {self.name}"
                try:
                    out = method(self, *args, **kwargs)
                except _BROKEN as exc:
                    if not peer_failure(exc):
                        raise
                    raise describe(exc, what) from None
                return _wrap_work(out, what) if kwargs.get("async_op") else out
            return call
        setattr(cls, name, make(method, name))
    return cls
