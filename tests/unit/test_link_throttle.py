"""Simulated cross-site links: a transfer is stretched to latency + bytes / bandwidth."""
import pytest
import torch

from megahet.errors import MegahetError
from megahet.hetero.cluster import parse_cluster
from megahet.parallel.link_throttle import (LinkThrottle, SiteThrottle, _Receipt, arrival_wait, cluster_throttles,
                                            rank_sites, scalar_collective_delay, site_throttles)


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


def test_arrival_adds_one_senders_bytes_and_takes_the_latest_sender():
    link = LinkThrottle(bandwidth=1e6, latency=0.1)
    # sender 3 posted at t=10 two messages of 0.2 MB: 0.1 + 0.4 s; sender 5 posted at 10.3 0.1 MB: 0.2 s
    got = [(3, link, 200_000, 10.0), (3, link, 200_000, 10.0), (5, link, 100_000, 10.3)]
    assert arrival_wait(got, now=10.05) == pytest.approx(10.5 - 10.05)
    assert arrival_wait(got, now=11.0) == 0.0  # arrived while the receiver was busy: no wait
    assert arrival_wait([], now=3.0) == 0.0


class _Done:
    def wait(self):
        return None


def test_receipt_sleeps_until_the_stamped_arrival_on_a_fake_clock():
    link = LinkThrottle(bandwidth=1e9, latency=0.01)
    slept = []
    owner = SiteThrottle(1, [[None, link], [link, None]], clock=lambda: 50.002, sleep=slept.append)
    stamp = torch.tensor([50.0], dtype=torch.float64)
    receipt = _Receipt(owner, [(_Done(), stamp)], [(0, link, 4_000_000, stamp)])
    assert receipt.finish() == pytest.approx(0.012)  # 50.0 + 0.01 + 0.004 - 50.002
    assert slept == [pytest.approx(0.012)] and owner.waited_s == pytest.approx(0.012)


def test_cluster_throttles_only_with_sites_and_a_link():
    two = {"groups": [{"backend": "cpu", "devices": 1, "site": "a"}, {"backend": "sim", "devices": 1, "site": "b"}]}
    assert cluster_throttles(parse_cluster(two)) is None  # no cross_site link given
    linked = parse_cluster({**two, "links": {"cross_site": 2.0}})
    assert cluster_throttles(linked)[0][1] == LinkThrottle(2e9, 0.0)
    one = parse_cluster({"groups": [{"backend": "cpu", "devices": 2, "site": "a"}], "links": {"cross_site": 2.0}})
    assert cluster_throttles(one) is None


def test_scalar_collectives_cross_the_link_as_the_cost_model_charges():
    from megahet.hetero import cost_model as cm
    table = site_throttles(["a", "a", "b", "b"], {"cross_site": 0.05, "cross_site_latency_ms": 20})
    delay = scalar_collective_delay(table, 4)
    # 4 ranks: a tree up and down is 2 log2(4) = 4 messages of latency + bytes / bandwidth.
    assert delay(8) == pytest.approx(4 * (0.02 + 8 / 0.05e9))
    assert delay(0) == pytest.approx(cm.small_allreduce_time(4, 0.02))
    assert scalar_collective_delay(site_throttles(["a", "a"], {"cross_site": 0.05}), 2) is None  # one site
