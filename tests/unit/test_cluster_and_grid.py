"""Cluster spec parsing and the rank grid (pure logic, no processes)."""
import pytest

from megahet.errors import MegahetError
from megahet.hetero.cluster import load_cluster, parse_cluster
from megahet.parallel.context import grid_groups, grid_rank


def test_cluster_assigns_backends_in_order(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("groups:\n  - {name: fast, backend: cpu, devices: 2}\n  - {name: slow, backend: sim, devices: 1, speed: 0.5}\n"
                    "links: {cross_domain: 10}\n")
    spec = load_cluster(str(path))
    assert spec.world_size == 3
    specs = spec.rank_specs()
    assert [s.backend for s in specs] == ["cpu", "cpu", "sim"]
    assert specs[2].options == {"speed": 0.5}
    assert spec.links["cross_domain"] == 10.0


@pytest.mark.parametrize("raw,match", [
    ({}, "non-empty 'groups'"),
    ({"groups": [{"backend": "cpu"}]}, "needs 'backend' and 'devices'"),
    ({"groups": [{"backend": "cpu", "devices": 1, "sped": 1}]}, "unknown key"),
    ({"groups": [{"backend": "cpu", "devices": 1, "speed": 0.5}]}, "sim backend only"),
])
def test_cluster_errors(raw, match):
    with pytest.raises(MegahetError, match=match):
        parse_cluster(raw).rank_specs()


def test_grid_groups_layout():
    g = grid_groups(8, tp=2, pp=2, ep=2)
    assert g["tp"][0] == [0, 1] and g["tp"][1] == [2, 3]
    assert [0, 2] in g["dp"] and [4, 6] in g["dp"]
    assert [0, 4] in g["pp"] and [3, 7] in g["pp"]
    assert [0, 2] in g["ep"] and [0] in g["expert_dp"]
    assert grid_rank(1, 1, 1, 2, 2) == 7
    for kind, lists in g.items():
        if kind == "embedding":
            continue
        covered = sorted(r for ranks in lists for r in ranks)
        assert covered == list(range(8)), kind  # each kind partitions the world


def test_grid_rejects_bad_sizes():
    with pytest.raises(MegahetError, match="not divisible"):
        grid_groups(6, tp=4, pp=1, ep=1)
    with pytest.raises(MegahetError, match="--expert-model-parallel-size 4"):
        grid_groups(4, tp=2, pp=1, ep=4)
