"""Naming the ranks that never arrived at a timed-out collective, from two heartbeat readings."""
from megahet.parallel.heartbeat import Progress, beat_interval, explain_peers


def _rec(beat, step, last, **seq):
    return {"beat": beat, "step": step, "in": last, "seq": seq}


def test_peers_behind_on_the_group_are_named_with_their_state():
    first = {1: _rec(4, 3, "broadcast over tp[0, 1]", g=4), 2: _rec(9, 3, "all_reduce over g", g=5),
             3: _rec(2, 2, "barrier over world", g=3)}
    second = {1: _rec(5, 3, "broadcast over tp[0, 1]", g=4), 2: _rec(10, 3, "all_reduce over g", g=5),
              3: _rec(2, 2, "barrier over world", g=3)}
    msg = explain_peers([1, 2, 3], first, second, 2.0, "g", 5)
    assert msg == ("never arrived: rank 1 (last heartbeat: in step 3, last entered broadcast over tp[0, 1]); rank 3 "
                   "(last heartbeat: in step 2, last entered barrier over world; none for 2+ s: dead or stopped)")


def test_when_every_peer_arrived_the_dead_ones_are_named():
    first = {1: _rec(4, 3, "all_reduce over g", g=5), 2: _rec(4, 3, "all_reduce over g", g=6)}
    second = {1: _rec(4, 3, "all_reduce over g", g=5), 2: _rec(5, 3, "all_reduce over g", g=6)}
    assert explain_peers([1, 2], first, second, 1.0, "g", 5) == \
        ("every peer entered it, but rank 1 (last heartbeat: in step 3, last entered all_reduce over g; none for 1+ s: "
         "dead or stopped)")
    assert explain_peers([2], {2: None}, {2: None}, 1.0, "g", 1) == "never arrived: rank 2 never published a heartbeat"
    assert explain_peers([2], first, second, 1.0) == "rank 2 (last heartbeat: in step 3, last entered all_reduce over g)"


def test_counting_is_per_group_and_the_fast_path_needs_no_store():
    p = Progress(0)
    assert [p.enter("a", "x over a"), p.enter("b", "y over b"), p.enter("a", "z over a")] == [1, 1, 2]
    assert p.snapshot() == {"beat": 0, "step": 0, "in": "z over a", "seq": {"a": 2, "b": 1}}
    assert p.explain([1], "a", 2) is None  # no store: nothing to read
    assert beat_interval(600, 8) == 5.0 and beat_interval(3, 2) == 0.75 and beat_interval(600, 50_000) == 25.0


def test_stop_waits_for_a_beat_in_flight():
    """A beat still inside the store's call when the process exits can abort it (SIGABRT): stop() joins."""
    import threading
    import time

    class SlowStore:
        def __init__(self):
            self.sets, self.inside = 0, threading.Event()

        def set(self, key, value):
            self.sets += 1
            if self.sets > 1:  # the first set is start()'s own, on the caller's thread
                self.inside.set()
                time.sleep(0.3)

    store = SlowStore()
    p = Progress(0, store, interval_s=0.01)
    p.start()
    assert store.inside.wait(5)  # the thread is inside a beat
    p.stop()
    assert not p._thread.is_alive()
