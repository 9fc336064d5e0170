"""The exact min-max batch split shared by the planner and --rebalance, against brute force."""
import itertools
import math
import random

from megahet.hetero.batch_split import min_max_split


def _brute(times, total):
    best = None
    for split in itertools.product(range(1, total + 1), repeat=len(times)):
        if sum(split) == total:
            t = max(row[s] for row, s in zip(times, split))
            if t < math.inf and (best is None or t < best):
                best = t
    return best


def test_min_max_split_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        n, total = rng.randint(1, 3), rng.randint(1, 9)
        times = []
        for _ in range(n):
            m = rng.choice((1, 2, 3))
            fill = rng.random()
            times.append([math.inf] + [fill + s * rng.uniform(0.5, 2) if s % m == 0 else math.inf
                                       for s in range(1, total + 1)])
        got, want = min_max_split(times, total), _brute(times, total)
        if want is None:
            assert got is None, (times, total, got)
            continue
        assert got is not None and sum(got) == total and min(got) >= 1, (times, total, got)
        assert max(row[s] for row, s in zip(times, got)) == want


def test_min_max_split_hand_case():
    # Replica 1 is 3x slower per sample: 12 samples split 9 : 3 (both take 9).
    times = [[s * 1.0 for s in range(13)], [s * 3.0 for s in range(13)]]
    assert min_max_split(times, 12) == [9, 3]
    assert min_max_split([[math.inf] * 5, [float(s) for s in range(5)]], 4) is None  # replica 0 can take nothing
