"""Elastic re-plan: which groups survive, which group a rank is, and the one-line errors."""
import pytest

from megahet.errors import MegahetError
from megahet.hetero.cluster import parse_cluster
from megahet.hetero.elastic import GROUP_ENV, own_group, surviving_cluster

SPEC = parse_cluster({"groups": [{"name": "a", "backend": "cuda", "devices": 4, "devices_per_node": 4},
                                 {"name": "b", "backend": "npu", "devices": 2},
                                 {"name": "c", "backend": "sim", "devices": 1, "speed": 0.5}],
                      "links": {"cross_domain": 10}})


def test_a_lost_group_leaves_the_others_in_rank_order():
    cluster, lost = surviving_cluster(SPEC, ["c", "a", "a"])
    assert [(g.name, g.devices, g.devices_per_node) for g in cluster.groups] == [("c", 1, None), ("a", 2, 2)]
    assert cluster.groups[0].speed == 0.5 and cluster.links == {"cross_domain": 10.0}
    assert lost == ["'a' (2 of 4 devices)", "'b' (2 of 2 devices)"]
    assert surviving_cluster(SPEC, ["a"] * 4 + ["b"] * 2 + ["c"])[1] == []


def test_bad_group_reports_are_one_line_errors():
    with pytest.raises(MegahetError, match="3 ranks report cluster group 'b', which has 2 devices"):
        surviving_cluster(SPEC, ["b", "b", "b"])
    with pytest.raises(MegahetError, match="must be consecutive"):
        surviving_cluster(SPEC, ["a", "b", "a"])


def test_a_rank_finds_its_group_from_the_environment_or_its_backend():
    assert own_group(SPEC, {GROUP_ENV: "b"}, "cuda") == "b"
    assert own_group(SPEC, {}, "npu") == "b"
    with pytest.raises(MegahetError, match=f"{GROUP_ENV}=x names no group"):
        own_group(SPEC, {GROUP_ENV: "x"}, "cpu")
    with pytest.raises(MegahetError, match=f"0 groups run this host's backend 'cpu'.*set {GROUP_ENV}"):
        own_group(SPEC, {}, "cpu")


def test_survivors_without_the_memory_for_the_model_get_a_one_line_error(tmp_path, monkeypatch):
    from megahet.config import build_config
    from megahet.training.pretrain import build_context
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("groups:\n  - {name: fast, backend: cpu, devices: 1, memory_gb: 0.0001}\n"
                       "  - {name: slow, backend: sim, devices: 1, memory_gb: 64}\n")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv(GROUP_ENV, raising=False)
    cfg = build_config(overrides=dict(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                                      vocab_size=128, global_batch_size=8, micro_batch_size=2, train_iters=1,
                                      mock_data=True, cluster=str(cluster), elastic=True))
    with pytest.raises(MegahetError) as err:
        build_context(cfg)
    msg = str(err.value)
    assert msg.startswith("after losing 'slow' (1 of 1 devices), the 1 ranks left cannot run this job: group 'fast' "
                          "(1 x 0.0001 GB) lacks memory"), msg
    assert "more per device" in msg and "\n" not in msg
