"""Straggler reports and the replica split chosen from measured speeds (no processes)."""
import itertools

from megahet.training.rebalance import Rebalancer, best_split, predicted_step, straggler_report


def test_best_split_is_optimal_in_whole_micro_batches():
    for costs in ([1.0, 1.0], [1.0, 4.0], [3.0, 1.0, 2.0], [1.0, 1.0, 10.0, 1.0]):
        for mbs in (1, 2):
            gbs = 12 * mbs
            got = best_split(costs, gbs, [mbs] * len(costs))
            assert sum(got) == gbs and min(got) >= mbs and all(g % mbs == 0 for g in got)
            brute = min(predicted_step([c * mbs for c in split], costs)
                        for split in itertools.product(range(1, 13), repeat=len(costs)) if sum(split) == 12)
            assert predicted_step(got, costs) == brute


def test_rebalancer_moves_work_only_for_a_real_gain():
    rb = Rebalancer(16, [1, 1], min_gain=0.05, smoothing=1.0, warmup_steps=1)
    assert rb.update([8, 8], [0.1, 9.0]) == [8, 8]  # the first step is warm-up: ignored
    assert rb.update([8, 8], [0.80, 0.82]) == [8, 8]  # balanced within noise: keep
    assert rb.update([8, 8], [0.8, 4.0]) == [14, 2]  # replica 1 became 5x slower per sample: max(1.4, 1.0)
    assert rb.update([14, 2], [1.4, 1.0]) == [14, 2]  # settled


def test_straggler_report():
    rep = straggler_report([1.0, 1.1, 0.9, 2.0], threshold=1.3)
    assert rep["straggler_rank"] == 3 and rep["slowest_ratio"] == 2.0 / 1.05
    assert straggler_report([1.0, 1.1, 1.2], threshold=1.3)["straggler_rank"] == -1


def test_best_split_keeps_each_replicas_micro_batch_size():
    got = best_split([1.0, 3.0], 12, [2, 1])  # replica 0 takes micro-batches of 2, replica 1 of 1
    assert got == [10, 2] and sum(got) == 12  # max(10 x 1, 2 x 3): greedy would stop at [8, 4]
    for costs in ([1.0, 2.0, 0.5], [3.0, 1.0, 1.0]):
        got = best_split(costs, 24, [2, 4, 1])
        brute = min(predicted_step([a * 2, b * 4, 24 - a * 2 - b * 4], costs)
                    for a in range(1, 12) for b in range(1, 6) if 24 - a * 2 - b * 4 >= 1)
        assert sum(got) == 24 and got[0] % 2 == 0 and got[1] % 4 == 0 and predicted_step(got, costs) == brute
    assert best_split([1.0, 1.0], 7, [2, 4]) is None  # 7 samples cannot be cut into 2s and 4s


def test_saved_split_resumes_only_the_same_plan_re_split():
    from megahet.hetero.plan import Plan
    from megahet.training.rebalance import saved_split

    def plan(a, b, slow="slow", mbs=1):
        return Plan.from_dict({"layers": [4], "pipelines": [
            {"micro_batch_size": 1, "micro_batches": a, "stages": [{"group": "fast"}]},
            {"micro_batch_size": mbs, "micro_batches": b, "stages": [{"group": slow}]}]})

    running = plan(16, 16)
    assert saved_split({"plan": plan(26, 6).to_dict()}, running, 32) == [26, 6]
    assert saved_split({"plan": plan(16, 16).to_dict()}, running, 32) is None  # nothing moved
    assert saved_split({"plan": plan(26, 6, slow="other").to_dict()}, running, 32) is None  # another plan
    assert saved_split({"plan": plan(26, 3, mbs=2).to_dict()}, running, 32) is None  # other micro-batch sizes
    assert saved_split({"plan": plan(20, 6).to_dict()}, running, 32) is None  # another global batch
    assert saved_split({}, running, 32) is None and saved_split(None, running, 32) is None
