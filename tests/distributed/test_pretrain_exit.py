"""A finished job takes its process groups down itself (examples/pretrain_gpt.py -> close_distributed)
rather than leaving them to interpreter exit."""
import importlib.util
import os

from megahet.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _main_then_state(argv):
    import torch.distributed as dist
    spec = importlib.util.spec_from_file_location("pretrain_gpt_example", os.path.join(ROOT, "examples",
                                                                                       "pretrain_gpt.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    code = example.main(argv)
    return code, dist.is_initialized()


def test_the_example_destroys_its_process_groups_after_training(tmp_path):
    argv = ["--mock-data", "--train-iters", "2", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads",
            "4", "--seq-length", "32", "--vocab-size", "512", "--global-batch-size", "4", "--micro-batch-size", "1",
            "--log-interval", "1", "--eval-interval", "100000", "--metrics-file", str(tmp_path / "m.jsonl")]
    results = run_distributed(_main_then_state, 2, argv, timeout=120)
    assert results == [(0, False), (0, False)]  # trained, exit code 0, no process group left behind
