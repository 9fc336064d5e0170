"""Who never arrived: each rank's progress, published on a heartbeat, read when a collective times out.

Why: a timed-out collective tells the waiting rank only that it waited. To name the rank that hung
(and where it is), every rank keeps a cheap in-memory record -- the training step, how many
collectives it has entered on each group, the last one -- and a background thread publishes it to the
rendezvous store every few seconds (no store round trip on the fast path). Members of a group call its
collectives in the same order, so on a timeout in the n-th call on group G, a peer whose count for G
is below n never arrived. Reading the peers twice, a few beats apart, tells a live rank (stuck
elsewhere) from a dead or stopped one (its beat no longer advances).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from typing import Dict, Optional, Sequence

import torch.distributed as dist

log = logging.getLogger("megahet")


class Progress:
    """This rank's step and collective counts (`enter` on every collective), and the heartbeat thread.

    Args:
        rank: this process's global rank.
        store: a torch.distributed Store this rank's records go to (None: nothing is published and
            `explain` says nothing).
        interval_s: seconds between beats.
    """

    def __init__(self, rank: int, store=None, interval_s: float = 5.0):
        self.rank, self.store, self.interval_s = rank, store, interval_s
        self._step = 0
        self._seq: Dict[str, int] = {}
        self._last = ""
        self._beat = 0
        self._published = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        """The training loop sets it at every step; a new step is published early (at most 4 per beat),
        so a rank that dies soon after is named with its step, not the one a beat ago."""
        self._step = value
        if self._thread is not None and time.monotonic() - self._published >= self.interval_s / 4:
            self._wake.set()

    def enter(self, group: str, what: str) -> int:
        """Count a call on `group` (the name of a CommGroup); returns its number (1, 2, ...)."""
        with self._lock:
            n = self._seq[group] = self._seq.get(group, 0) + 1
            self._last = what
        return n

    def snapshot(self) -> dict:
        with self._lock:
            return {"beat": self._beat, "step": self._step, "in": self._last, "seq": dict(self._seq)}

    # ------------------------------------------------------------------ heartbeat
    def start(self) -> None:
        if self.store is None or self._thread is not None:
            return
        self._publish()
        self._thread = threading.Thread(target=self._run, name="megahet-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop beating and wait (up to `timeout_s`) for the thread to finish a beat it is in. Returning
        while it may still be inside the store's C++ call would let the interpreter exit under it: a daemon
        thread re-taking the GIL during finalization is unwound by pthread_exit, and unwinding through
        the store's C++ frames aborts the process ("terminate called without an active exception", a
        SIGABRT exit from a run that had finished)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def _publish(self) -> None:
        with self._lock:
            self._beat += 1
        self._published = time.monotonic()
        self.store.set(str(self.rank), json.dumps(self.snapshot()))

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._publish()
            except Exception as exc:  # noqa: BLE001 - the store is gone (job ending): stop beating
                log.debug("heartbeat of rank %d stopped: %s", self.rank, exc)
                return

    def read(self, ranks: Sequence[int]) -> Dict[int, Optional[dict]]:
        """The last published record of every rank in `ranks` (None: never published)."""
        out: Dict[int, Optional[dict]] = {}
        for r in ranks:
            key = str(r)
            out[r] = json.loads(self.store.get(key)) if self.store.check([key]) else None
        return out

    def explain(self, peers: Sequence[int], group: Optional[str] = None, seq: Optional[int] = None) -> Optional[str]:
        """Which of `peers` never arrived at call `seq` on `group` (or, without a group, every peer's
        state), read from the store twice a few beats apart; None when nothing can be read."""
        if self.store is None or not peers:
            return None
        try:
            first = self.read(peers)
            wait = 2 * self.interval_s + 0.5
            time.sleep(wait)
            second = self.read(peers)
        except Exception:  # noqa: BLE001 - the store died with the job (e.g. its host rank)
            return "(the rendezvous store is unreachable, so the other ranks' states are unknown)"
        return explain_peers(peers, first, second, wait, group, seq)


def explain_peers(peers: Sequence[int], first: Dict[int, Optional[dict]], second: Dict[int, Optional[dict]],
                  wait_s: float, group: Optional[str] = None, seq: Optional[int] = None) -> str:
    """One clause naming the peers that never arrived (pure; see Progress.explain).

    With `group`/`seq`: the peers whose count of calls on `group` is below `seq`; if every peer got
    there, the dead ones. Without: every peer's state.
    """
    def state(r: int) -> str:
        a, b = first.get(r), second.get(r)
        if b is None:
            return f"rank {r} never published a heartbeat"
        alive = a is None or b["beat"] > a["beat"]
        when = f"in step {b['step']}" if b["step"] else "before the first step"
        where = f"last heartbeat: {when}, last entered {b['in'] or 'no collective'}"
        return f"rank {r} ({where}" + (")" if alive else f"; none for {wait_s:.0f}+ s: dead or stopped)")

    if group is None:
        return "; ".join(state(r) for r in peers)
    missing = [r for r in peers if second.get(r) is None or second[r]["seq"].get(group, 0) < seq]
    if missing:
        return "never arrived: " + "; ".join(state(r) for r in missing)
    dead = [r for r in peers if first.get(r) and second[r]["beat"] <= first[r]["beat"]]
    if dead:
        return "every peer entered it, but " + "; ".join(state(r) for r in dead)
    return "every peer entered it and is alive (a network fault?)"


def heartbeat_store(rank: int, timeout_s: float):
    """A store client for heartbeats (prefixed by the torchrun attempt), or None outside torchrun's env."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not (port or "").isdigit():
        return None
    try:
        store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=max(5.0, min(timeout_s, 30.0))))
    except Exception as exc:  # noqa: BLE001 - no heartbeat; errors then say less, training is unaffected
        log.warning("rank %d: no heartbeat store at %s:%s (%s); timeout errors will not name the hung rank",
                    rank, host, port, exc)
        return None
    return dist.PrefixStore(f"megahet/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/heartbeat", store)


def beat_interval(timeout_s: float, world_size: int) -> float:
    """Seconds between beats: a few per timeout, fewer store writes on large jobs (~2,000 per second)."""
    return max(0.25, min(timeout_s / 4.0, max(5.0, world_size / 2000.0)))
