"""Config tree: strict YAML, flags derived from field names, cross-field validation messages."""
import pytest

from megahet.config import build_arg_parser, build_config, config_from_dict, load_yaml, parse_args, validate_world
from megahet.errors import MegahetError

BASE = dict(train_iters=1, mock_data=True)


def cfg(**over):
    return build_config(overrides={**BASE, **over})


def test_flags_are_derived_from_field_names_and_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 6\n  hidden_size: 128\ntrain:\n  train_iters: 5\n  mock_data_typo: 1\n"
                    .replace("  mock_data_typo: 1\n", ""))
    c = parse_args(["--config", str(path), "--num-layers", "8", "--tensor-model-parallel-size", "2", "--mock-data",
                    "--pipeline-layers", "5,3", "--pipeline-model-parallel-size", "2", "--data-path", "0.7", "A",
                    "0.3", "B", "--no-swiglu", "--bf16"])
    assert c.model.num_layers == 8 and c.model.hidden_size == 128
    assert c.parallel.tensor_model_parallel_size == 2 and c.parallel.pipeline_layers == [5, 3]
    assert c.data.data_path == ["0.7", "A", "0.3", "B"] and c.model.swiglu is False and c.train.bf16
    flags = build_arg_parser().format_help()
    for flag in ["--num-query-groups", "--moe-router-topk", "--sequence-parallel", "--use-distributed-optimizer",
                 "--recompute-granularity", "--metrics-file", "--num-layers-per-virtual-pipeline-stage"]:
        assert flag in flags


def test_unknown_yaml_key_names_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layayers: 4\n")
    with pytest.raises(MegahetError, match="unknown key 'model.num_layayers'.*did you mean 'num_layers'"):
        load_yaml(str(path))
    path.write_text("trian:\n  lr: 1\n")
    with pytest.raises(MegahetError, match="did you mean 'train'"):
        load_yaml(str(path))


@pytest.mark.parametrize("over,match", [
    (dict(num_attention_heads=6, hidden_size=96, tensor_model_parallel_size=4),
     "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (dict(num_attention_heads=8, num_query_groups=3), "--num-query-groups 3 does not divide --num-attention-heads 8"),
    (dict(num_attention_heads=8, num_query_groups=2, tensor_model_parallel_size=4),
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (dict(num_experts=6, expert_model_parallel_size=4), "--num-experts 6 is not divisible by --expert-model-parallel-size 4"),
    (dict(num_experts=4, moe_router_topk=5), "--moe-router-topk 5 is larger than --num-experts 4"),
    (dict(bf16=True, fp16=True), "--bf16 and --fp16 are exclusive"),
    (dict(pipeline_model_parallel_size=2, pipeline_layers=[3, 3], num_layers=4), "sums to 6, not --num-layers 4"),
    (dict(train_iters=None), "set --train-iters or --train-samples"),
    (dict(min_lr=1.0, lr=0.1), "--min-lr 1.0 is larger than --lr 0.1"),
])
def test_validation_messages_name_flags(over, match):
    with pytest.raises(MegahetError, match=match) as info:
        cfg(**over)
    assert "\n" not in str(info.value)


def test_world_checks():
    c = cfg(global_batch_size=12, micro_batch_size=4)
    with pytest.raises(MegahetError, match="--global-batch-size 12 is not divisible by --micro-batch-size 4 x data-parallel size 2"):
        validate_world(c, 2)
    with pytest.raises(MegahetError, match="world size 6 is not divisible"):
        validate_world(cfg(tensor_model_parallel_size=4, num_attention_heads=4, hidden_size=64), 6)
    validate_world(cfg(global_batch_size=16, micro_batch_size=4), 4)


def test_bad_type_and_choice():
    with pytest.raises(MegahetError, match="--num-layers"):
        build_config(overrides={**BASE, "num_layers": "many"})
    with pytest.raises(MegahetError, match="--normalization must be one of"):
        cfg(normalization="BatchNorm")


def test_round_trip_through_dict():
    c = cfg(num_layers=3, num_experts=4, moe_router_topk=1)
    again = config_from_dict(c.to_dict())
    assert again.to_dict() == c.to_dict()
