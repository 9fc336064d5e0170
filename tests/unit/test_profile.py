"""Profile look-ups at micro-batch sizes that were not measured."""
import pytest

from megahet.hetero.profile import Profile


def test_sizes_between_measured_ones_are_interpolated():
    p = Profile("cpu", "k", times={"layer/1": [1.0, 2.0], "layer/4": [4.0, 8.0]})
    assert p.time("layer", 2) == pytest.approx((2.0, 4.0))
    assert p.time("layer", 4) == (4.0, 8.0)


def test_beyond_the_measured_sizes_scales_from_the_nearest_one_and_stays_positive():
    # Noise at tiny sizes: mbs 1 measured slower per sample than mbs 4 would allow a line to go negative.
    p = Profile("cpu", "k", times={"layer/1": [0.004, 0.010], "layer/2": [0.003, 0.005], "layer/4": [0.002, 0.003]})
    fwd, bwd = p.time("layer", 8)
    assert fwd == pytest.approx(0.004) and bwd == pytest.approx(0.006)  # 2 x the mbs-4 figures
    p1 = Profile("cpu", "k", times={"layer/2": [2.0, 4.0], "layer/4": [3.0, 6.0]})
    assert p1.time("layer", 1) == pytest.approx((1.0, 2.0))  # half the mbs-2 figures
