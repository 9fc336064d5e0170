"""tools/plan.py: stable JSON, --output accepted by --plan (Plan.from_yaml + validate), fixed layouts,
one-line errors."""
import importlib.util
import json
import os

import pytest

from megahet.hetero.cluster import load_cluster
from megahet.hetero.plan import Plan

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CONFIGS = os.path.join(ROOT, "examples", "configs")

CLUSTER = """
groups:
  - {name: fast, backend: cpu, devices: 2, tflops: 0.2, memory_gb: 4}
  - {name: slow, backend: sim, devices: 2, speed: 0.5, tflops: 0.1, memory_gb: 4}
links: {cross_domain: 10}
"""


def _tool():
    spec = importlib.util.spec_from_file_location("plan_tool", os.path.join(ROOT, "tools", "plan.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(capsys, *argv):
    code = _tool().main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


MODEL = ["--num-layers", "6", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "128",
         "--vocab-size", "2000", "--global-batch-size", "16", "--no-profile"]


def test_json_is_stable_and_has_the_documented_keys(tmp_path, capsys):
    cluster = tmp_path / "c.yaml"
    cluster.write_text(CLUSTER)
    code, first, _ = _run(capsys, "--cluster", str(cluster), *MODEL, "--json")
    assert code == 0
    code, second, _ = _run(capsys, "--cluster", str(cluster), *MODEL, "--json")
    assert first == second
    obj = json.loads(first)
    assert obj["step_time_s"] > 0 and obj["tokens_per_s"] > 0
    assert set(obj["memory_gb"]) == {"fast", "slow"} and set(obj["mfu"]) == {"fast", "slow"}
    assert abs(obj["tokens_per_s"] * obj["step_time_s"] - 16 * 128) < 1e-3 * 16 * 128


def test_output_round_trips_into_plan(tmp_path, capsys):
    cluster = tmp_path / "c.yaml"
    cluster.write_text(CLUSTER)
    out = tmp_path / "plan.yaml"
    code, text, _ = _run(capsys, "--cluster", str(cluster), *MODEL, "--json", "--output", str(out))
    assert code == 0
    plan = Plan.from_yaml(str(out))
    assignment = plan.validate(load_cluster(str(cluster)), 6, 16, 4, num_attention_heads=4, num_query_groups=4)
    assert sorted(r for row in assignment for ranks in row for r in ranks) == [0, 1, 2, 3]
    assert plan.to_dict()["layers"] == json.loads(text)["plan"]["layers"]
    assert plan.predicted["step_time_s"] == pytest.approx(json.loads(text)["step_time_s"], rel=1e-5)


def test_fixed_layout_flags_are_evaluated_as_given(tmp_path, capsys):
    cluster = tmp_path / "c.yaml"
    cluster.write_text(CLUSTER)
    code, text, _ = _run(capsys, "--cluster", str(cluster), *MODEL, "--json", "--pipeline-model-parallel-size", "2",
                         "--micro-batch-size", "2", "--pipeline-layers", "4,2", "--recompute-granularity", "full")
    assert code == 0
    obj = json.loads(text)
    assert obj["plan"]["layers"] == [4, 2]
    assert {p["micro_batch_size"] for p in obj["plan"]["pipelines"]} == {2}
    assert obj["recompute_granularity"] == "full"


def test_figure_and_text(tmp_path, capsys):
    cluster = tmp_path / "c.yaml"
    cluster.write_text(CLUSTER)
    fig = tmp_path / "plan.png"
    code, text, _ = _run(capsys, "--cluster", str(cluster), *MODEL, "--figure", str(fig))
    assert code == 0 and fig.stat().st_size > 1000
    assert "predicted step time" in text and "memory/rank GB" in text


def test_infeasible_cluster_is_one_line_naming_the_group(tmp_path, capsys):
    cluster = tmp_path / "c.yaml"
    cluster.write_text(CLUSTER.replace("memory_gb: 4}\n  - {name: slow", "memory_gb: 4}\n  - {name: slow")
                       .replace("tflops: 0.1, memory_gb: 4", "tflops: 0.1, memory_gb: 0.001"))
    code, _, err = _run(capsys, "--cluster", str(cluster), *MODEL, "--layout", "mixed")
    assert code == 2
    assert err.startswith("megahet error: group 'slow'") and err.count("\n") == 1


def test_big_cluster_configs_plan_without_profiling(capsys):
    code, text, _ = _run(capsys, "--cluster", os.path.join(CONFIGS, "cluster_h100_8k.yaml"), "--config",
                         os.path.join(CONFIGS, "llama3_405b.yaml"), "--tensor-model-parallel-size", "8",
                         "--pipeline-model-parallel-size", "16", "--data-parallel-size", "64", "--json")
    assert code == 0
    obj = json.loads(text)
    assert obj["memory_gb"]["h100"] <= 80
    assert len(obj["plan"]["pipelines"]) == 64 and len(obj["plan"]["layers"]) == 16
