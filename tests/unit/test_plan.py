"""Plan object: YAML round trip, rank assignment, uniform plans and every one-line validation error."""
import pytest

from megahet.errors import MegahetError
from megahet.hetero.cluster import parse_cluster
from megahet.hetero.plan import Plan, even_layers, rank_domains, single_group_cluster

CLUSTER = parse_cluster({"groups": [{"name": "fast", "backend": "cpu", "devices": 4},
                                    {"name": "slow", "backend": "sim", "devices": 2, "speed": 0.5}]})

PLAN_YAML = """
layers: [5, 3]
virtual_stages: 1
expert_parallel: 1
pipelines:
  - micro_batch_size: 2
    micro_batches: 4
    stages:
      - {group: fast, tensor_parallel: 2}
      - {group: slow, tensor_parallel: 1}
  - micro_batch_size: 1
    micro_batches: 4
    stages:
      - {group: fast, tensor_parallel: 2}
      - {group: slow, tensor_parallel: 1}
predicted: {step_time_s: 1.9}
"""


def test_yaml_round_trip_and_assignment(tmp_path):
    plan = Plan.from_yaml(PLAN_YAML)
    assert plan.layers == [5, 3] and plan.num_stages == 2 and plan.num_pipelines == 2
    assert plan.global_batch_size == 12 and plan.predicted == {"step_time_s": 1.9}
    assert plan.stage_tp(0) == 2 and plan.stage_tp(1) == 1 and not plan.is_uniform()
    assert plan.validate(CLUSTER, num_layers=8, global_batch_size=12, world_size=6) == [[[0, 1], [4]], [[2, 3], [5]]]
    path = tmp_path / "plan.yaml"
    text = plan.to_yaml(str(path))
    assert "- {group: fast, tensor_parallel: 2}" in text  # one stage a line, as people write it
    again = Plan.from_yaml(str(path))
    assert again == plan and Plan.from_dict(plan.to_dict()) == plan


def test_listed_ranks_and_default_ranks_mix():
    plan = Plan.from_yaml(PLAN_YAML.replace("- {group: fast, tensor_parallel: 2}\n      - {group: slow",
                                            "- {group: fast, tensor_parallel: 2, ranks: [2, 3]}\n      - {group: slow", 1))
    # Pipeline 0 lists ranks 2, 3, so pipeline 1 takes the unused 0, 1.
    assert plan.validate(CLUSTER, 8, 12, 6) == [[[2, 3], [4]], [[0, 1], [5]]]


def test_uniform_plan_keeps_the_classic_rank_order():
    plan = Plan.uniform(tp=2, pp=2, dp=2, layers=[2, 2], micro_batch_size=1, micro_batches=3)
    cluster = single_group_cluster(8)
    # rank = tp_rank + tp * (dp_rank + dp * pp_rank)
    assert plan.validate(cluster, 4, 6, 8) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    assert plan.is_uniform() and even_layers(8, 3) == [3, 3, 2]
    mixed = Plan.uniform(tp=1, pp=2, dp=3, layers=[1, 1], micro_batch_size=1, micro_batches=1, cluster=CLUSTER)
    assert [s.group for s in mixed.pipelines[2].stages] == ["fast", "slow"]


def test_domains():
    two_sims = parse_cluster({"groups": [{"backend": "cpu", "devices": 1},
                                         {"backend": "sim", "devices": 1},
                                         {"backend": "sim", "devices": 1, "domain": "other"}]})
    assert rank_domains(two_sims) == ["cpu", "sim", "other"]


def _raw():
    import yaml
    return yaml.safe_load(PLAN_YAML)


def _fails(raw, match, **kw):
    args = dict(num_layers=8, global_batch_size=12, world_size=6)
    args.update(kw)
    cluster = args.pop("cluster", CLUSTER)
    with pytest.raises(MegahetError, match=match) as err:
        Plan.from_dict(raw).validate(cluster, **args)
    assert "\n" not in str(err.value)


def test_tp_across_domains():
    raw = _raw()
    raw["pipelines"] = raw["pipelines"][:1]
    raw["pipelines"][0]["stages"][1] = {"group": "slow", "tensor_parallel": 2, "ranks": [2, 3]}
    cluster = parse_cluster({"groups": [{"name": "fast", "backend": "cpu", "devices": 3},
                                        {"name": "slow", "backend": "sim", "devices": 1}]})
    _fails(raw, r"ranks \[2, 3\] span communication domains \['cpu', 'sim'\]; TP groups must stay inside one vendor",
           cluster=cluster, world_size=4, global_batch_size=8)


def test_counts_not_summing_to_global_batch():
    _fails(_raw(), r"2x4 \+ 1x4 = 12 samples but --global-batch-size is 16", global_batch_size=16)


def test_ep_replicas_with_different_counts():
    raw = _raw()
    raw["expert_parallel"] = 2
    raw["pipelines"][1].update(micro_batch_size=2, micro_batches=2)
    _fails(raw, r"micro_batches \[4, 2\]; EP replicas must share", global_batch_size=12)


def test_more_ranks_than_the_world():
    raw = _raw()
    raw["pipelines"].append(raw["pipelines"][1])
    _fails(raw, "plan needs 9 ranks but the world has 6", global_batch_size=16)


def test_other_errors():
    raw = _raw()
    _fails(raw, r"sum to 8 but --num-layers is 9", num_layers=9)
    _fails(raw, "describes 6 ranks but 5 were launched", world_size=5)
    raw = _raw()
    raw["pipelines"][1]["stages"][0]["tensor_parallel"] = 1
    _fails(raw, r"stage 0 has tensor_parallel \[2, 1\] across pipelines")
    raw = _raw()
    raw["pipelines"][1]["stages"].pop()
    _fails(raw, "pipeline 1 has 1 stages but layers has 2")
    raw = _raw()
    raw["pipelines"][1]["stages"][1]["group"] = "fast"
    _fails(raw, "needs 1 more rank")
    raw = _raw()
    raw["pipelines"][1]["stages"][1]["group"] = "nope"
    _fails(raw, "group 'nope' is not in the cluster spec")
    raw = _raw()
    raw["pipelines"][0]["stages"][0]["ranks"] = [0, 9]
    _fails(raw, r"lists rank\(s\) \[9\] but the world has 6")
    raw = _raw()
    raw["pipelines"][0]["stages"][0]["ranks"] = [4, 5]
    raw["pipelines"][0]["stages"][1]["group"] = "slow"
    _fails(raw, r"rank\(s\) \[4, 5\], which belong to group\(s\) \['slow'\], not 'fast'")
    _fails(_raw(), "tensor_parallel 2, which does not divide num_attention_heads 3", num_attention_heads=3)
    raw = _raw()
    raw["virtual_stages"] = 4  # layers [5, 3]: the second stage cannot give each of 4 chunks a layer
    _fails(raw, "every stage needs at least virtual_stages 4 layers")
    raw = _raw()
    raw["pipelines"][1]["stages"] = [{"group": "fast", "tensor_parallel": 1}, {"group": "slow", "tensor_parallel": 1}]
    raw["pipelines"][0]["stages"][0]["tensor_parallel"] = 1
    _fails(raw, r"uses 4 of the world's 6 ranks \(idle: \[2, 3\]\)")
    raw = _raw()
    raw["expert_parallel"] = 2
    raw["pipelines"][1]["stages"][1] = {"group": "fast", "tensor_parallel": 1}
    cluster = parse_cluster({"groups": [{"name": "fast", "backend": "cpu", "devices": 5},
                                        {"name": "slow", "backend": "sim", "devices": 1}]})
    _fails(raw, r"expert-parallel group spanning communication domains", cluster=cluster)


@pytest.mark.parametrize("raw,match", [
    ({"layers": [4]}, "needs 'pipelines'"),
    ({"layers": [4], "pipelines": [], "x": 1}, r"unknown key\(s\) \['x'\]"),
    ({"layers": [0], "pipelines": [{}]}, r"layers\[0\] is 0"),
    ({"layers": [4], "pipelines": [{"micro_batch_size": 1, "micro_batches": 0, "stages": [{"group": "a"}]}]},
     "micro_batches is 0"),
    ({"layers": [4], "pipelines": [{"micro_batch_size": 1, "micro_batches": 1, "stages": [{"tp": 1}]}]},
     "must be a mapping with 'group'"),
])
def test_parse_errors(raw, match):
    with pytest.raises(MegahetError, match=match):
        Plan.from_dict(raw)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(MegahetError, match="not found"):
        Plan.from_yaml(str(tmp_path / "none.yaml"))
    with pytest.raises(MegahetError, match="not valid YAML"):
        Plan.from_yaml("layers: [1\npipelines: x")


def test_uneven_stages_interleave_without_divisibility():
    """[5, 3] layers with 2 virtual stages: chunks of 3 + 2 and 2 + 1 layers, in pipeline order."""
    from megahet.parallel.pipeline_layout import layers_per_stage
    raw = _raw()
    raw["virtual_stages"] = 2
    plan = Plan.from_dict(raw)
    plan.validate(CLUSTER, num_layers=8, global_batch_size=12, world_size=6)
    chunks = layers_per_stage(8, 2, 2, pipeline_layers=plan.layers)
    assert chunks == [[range(0, 3), range(5, 7)], [range(3, 5), range(7, 8)]]
