"""Auto-planning for training: uniform layouts the flags can express, the planner's Plan for --cluster,
and the command line each --confirm run gets."""
import importlib.util
import os

from megahet.config import build_config
from megahet.hetero import cost_model as cm
from megahet.hetero.autoplan import auto_layout, choose_plan, layout_flags_given, search_uniform
from megahet.hetero.cluster import parse_cluster
from megahet.hetero.planner import Settings, cluster_groups

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CLUSTER = {"groups": [{"name": "fast", "backend": "cuda", "devices": 1, "tflops": 10.0, "memory_gb": 8},
                      {"name": "slow", "backend": "npu", "devices": 1, "tflops": 5.0, "memory_gb": 8}]}


def _cfg(**kw):
    base = dict(num_layers=12, hidden_size=256, num_attention_heads=4, seq_length=128, vocab_size=1000,
                global_batch_size=16, micro_batch_size=2, train_iters=1, mock_data=True)
    base.update(kw)
    return build_config(overrides=base, validate=False)


def test_uniform_pipeline_gives_the_faster_group_more_layers():
    cfg = _cfg()
    cluster = parse_cluster(CLUSTER)
    spec = cm.ModelSpec.from_config(cfg)
    plan, pred, rc = search_uniform(spec, cluster_groups(cluster), cm.Links(), cluster, 16,
                                    {"pipeline_model_parallel_size": 2, "micro_batch_size": 2,
                                     "recompute_granularity": None}, Settings(max_virtual_stages=1))
    assert len(plan["layers"]) == 2 and plan["layers"][0] > plan["layers"][1] and sum(plan["layers"]) == 12
    assert [s["group"] for s in plan["pipelines"][0]["stages"]] == ["fast", "slow"]
    assert pred.feasible and rc is None


def test_auto_layout_writes_the_chosen_layout_into_the_config():
    cfg = _cfg(pipeline_model_parallel_size=2)
    assert layout_flags_given(cfg)
    plan = auto_layout(cfg, parse_cluster(CLUSTER))
    assert cfg.parallel.pipeline_model_parallel_size == 2
    assert cfg.parallel.pipeline_layers == plan["layers"]
    assert cfg.train.micro_batch_size == plan["pipelines"][0]["micro_batch_size"]
    assert not layout_flags_given(_cfg())


def test_a_layout_flag_equal_to_its_default_still_counts_as_given():
    from megahet.config import parse_args
    base = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--global-batch-size", "8", "--mock-data", "--train-iters", "1"]
    assert not layout_flags_given(parse_args(base))
    assert layout_flags_given(parse_args(base + ["--tensor-model-parallel-size", "1"]))
    assert layout_flags_given(parse_args(base + ["--pipeline-model-parallel-size", "1"]))
    assert layout_flags_given(_cfg(expert_model_parallel_size=1))


def test_choose_plan_returns_a_valid_runtime_plan():
    cfg = _cfg()
    cluster = parse_cluster(CLUSTER)
    plan = choose_plan(cfg, cluster)
    plan.validate(cluster, 12, 16, 2, num_attention_heads=4, num_query_groups=4)
    assert plan.global_batch_size == 16 and plan.predicted["step_time_s"] > 0


def test_confirm_runs_get_the_training_flags_only():
    spec = importlib.util.spec_from_file_location("plan_tool", os.path.join(ROOT, "tools", "plan.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--cluster", "c.yaml", "--num-layers", "4", "--json", "--confirm", "2", "--output=p.yaml", "--bf16",
            "--layout", "split"]
    assert tool._training_flags(argv) == ["--num-layers", "4", "--bf16"]


def test_elastic_replan_forgets_the_layout_flags_even_those_at_their_defaults():
    from megahet.hetero.elastic import _prepare_replan
    cluster = parse_cluster(CLUSTER)
    cfg = _cfg(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    assert layout_flags_given(cfg)
    _prepare_replan(cfg, cluster, cluster, ["slow"], None, None)
    assert cfg.parallel.pipeline_model_parallel_size == 1 and not layout_flags_given(cfg)
