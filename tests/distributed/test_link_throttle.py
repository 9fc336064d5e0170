"""Simulated sites: messages between them take the link's latency + bytes / bandwidth, others don't wait."""
import torch

from megahet.testing import run_distributed
from tests.distributed.throttle_cases import timed_cross_site_messages

NUMEL = 250_000  # 1 MB of fp32
LINK_S = 0.3 + 1e6 / 0.01e9  # 300 ms latency + 1 MB at 10 MB/s = 0.4 s


def test_cross_site_messages_take_the_link_time():
    r0, r1 = run_distributed(timed_cross_site_messages, 2, 300, 0.01, NUMEL, timeout=90)
    assert r0["hierarchical"] == "HierarchicalGroup"
    torch.testing.assert_close(r1["got"], torch.arange(NUMEL, dtype=torch.float32))
    expected = 2 * torch.arange(NUMEL, dtype=torch.float32) + 1
    torch.testing.assert_close(r0["sum"], expected)
    torch.testing.assert_close(r1["sum"], expected)
    assert r1["p2p_s"] >= LINK_S  # the receiver waits for the message to cross
    # The sender's message is buffered: it goes on without sleeping for the link (counted, not timed,
    # so a loaded machine cannot fail it).
    assert r0["p2p_waited_s"] == 0.0
    # Each rank receives the other's half-tensor shard (0.5 MB): 300 ms + 50 ms at least.
    assert min(r0["reduce_s"], r1["reduce_s"]) >= 0.3 + 0.5e6 / 0.01e9
    # A job-wide scalar crosses the link up and down a tree (2 messages at 2 ranks), as the cost model charges.
    assert r0["scalar"] == r1["scalar"] == 2.0
    assert min(r0["world_s"], r1["world_s"]) >= 2 * 0.3


def test_without_sites_nothing_waits():
    r0, r1 = run_distributed(timed_cross_site_messages, 2, 0, 0.0, NUMEL, timeout=90)
    torch.testing.assert_close(r1["got"], torch.arange(NUMEL, dtype=torch.float32))
    assert not r0["throttled"] and not r1["throttled"]  # no sites: no throttle, nothing ever sleeps
    assert not r0["world_delayed"] and not r1["world_delayed"] and r0["scalar"] == 2.0
