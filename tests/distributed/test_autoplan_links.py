"""Auto-planning's gloo link measurement for real: two processes measured once, cached (a second plan
is free), and a daemonic rank (which cannot start processes) taking the cache or, without one, the
defaults with a warning."""
import os

from megahet.hetero import profile
from megahet.testing import run_distributed
from tests.distributed.autoplan_cases import links_in_a_daemonic_rank

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def test_links_are_measured_once_and_daemonic_ranks_read_the_cache_or_fall_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAHET_CACHE_DIR", str(tmp_path))
    figures, warnings = run_distributed(links_in_a_daemonic_rank, 1, timeout=60,
                                        env={"MEGAHET_CACHE_DIR": str(tmp_path)})[0]
    assert figures == {} and any("not measured" in w and "no child processes" in w for w in warnings)

    measured = profile.load_or_measure_links(2, 1)
    for kind in ("intra_node", "cross_domain"):
        for key in [kind] + [f"{kind}/{op}" for op in OPS]:
            bw, lat = measured[key]
            assert bw > 1e6 and 0 <= lat < 0.1, (key, bw, lat)  # gloo on one host: MB/s or more, under 100 ms
    files = [f for f in os.listdir(tmp_path / "profiles") if f.startswith("links-")]
    assert len(files) == 1

    def no_second_measurement(*a, **k):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(profile, "measure_links", no_second_measurement)
    assert profile.load_or_measure_links(2, 1) == measured
    figures, warnings = run_distributed(links_in_a_daemonic_rank, 1, timeout=60,
                                        env={"MEGAHET_CACHE_DIR": str(tmp_path)})[0]
    assert figures == measured and not warnings
