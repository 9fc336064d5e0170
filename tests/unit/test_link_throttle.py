"""Simulated cross-site links: a transfer is stretched to latency + bytes / bandwidth."""
import pytest

from megahet.errors import MegahetError
from megahet.hetero.cluster import parse_cluster
from megahet.parallel.link_throttle import LinkThrottle, rank_sites, site_throttles


def test_finish_waits_for_the_rest_of_the_link_time():
    link = LinkThrottle(bandwidth=1e9, latency=0.01)
    assert link.duration(5_000_000) == pytest.approx(0.015)
    slept = []
    waited = link.finish(5_000_000, started=100.0, clock=lambda: 100.004, sleep=slept.append)
    assert waited == pytest.approx(0.011) and slept == [pytest.approx(0.011)]
    assert link.finish(5_000_000, started=100.0, clock=lambda: 101.0, sleep=slept.append) == 0.0


def test_only_pairs_on_different_sites_are_throttled():
    cluster = parse_cluster({"groups": [{"name": "a", "backend": "cpu", "devices": 2, "site": "dc1"},
                                        {"name": "b", "backend": "sim", "devices": 1, "site": "dc2"}],
                             "links": {"cross_site": 1.25, "cross_site_latency_ms": 10}})
    table = site_throttles(rank_sites(cluster), cluster.links)
    assert table[0][1] is None and table[2][2] is None
    assert table[0][2] == table[2][1] == LinkThrottle(1.25e9, 0.01)
    assert site_throttles(["x", "y"], {})[0][1] is None


def test_bad_link_is_a_one_line_error():
    with pytest.raises(MegahetError, match="cross_site"):
        LinkThrottle(0.0, 0.01)
