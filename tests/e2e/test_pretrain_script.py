"""The main job end to end: examples/pretrain_gpt.sh under torchrun, resume, load_model, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_gpt.sh")


def _script(tmp_path, *flags, nproc=2, timeout=300):
    env = dict(os.environ, RUN_DIR=str(tmp_path / "run"), NPROC_PER_NODE=str(nproc),
               MASTER_PORT=str(29500 + os.getpid() % 1000), WANDB_MODE="offline", WANDB_SILENT="true")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run(["bash", SCRIPT, *flags], env=env, capture_output=True, text=True, timeout=timeout)


def _metrics(tmp_path):
    with open(tmp_path / "run" / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


SMALL = ["--num-layers", "2", "--hidden-size", "64", "--seq-length", "32", "--moe-ffn-hidden-size", "32",
         "--moe-shared-expert-intermediate-size", "32", "--ffn-hidden-size", "128", "--global-batch-size", "8",
         "--micro-batch-size", "2", "--log-interval", "1", "--eval-interval", "3", "--save-interval", "3",
         "--lr-warmup-iters", "2"]


def test_example_trains_resumes_and_loads(tmp_path):
    first = _script(tmp_path, *SMALL, "--train-iters", "6")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    records = _metrics(tmp_path)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all("moe_aux_loss" in r and "tokens_per_s" in r for r in records)
    assert "valid_loss" in records[2]
    assert records[-1]["loss"] < records[0]["loss"]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000006"
    assert any(p.name.startswith("offline-run") for p in (tmp_path / "run" / "wandb").iterdir())

    again = _script(tmp_path, *SMALL, "--train-iters", "8")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["iteration"] for r in _metrics(tmp_path)][-2:] == [7, 8]

    from megahet import load_model
    model = load_model(str(ckpts))
    tokens = torch.randint(0, 100, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 8000) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_bad_data_path_is_one_line(tmp_path):
    bad = tmp_path / "broken"
    (tmp_path / "broken.bin").write_bytes(b"\0" * 10)
    (tmp_path / "broken.idx").write_bytes(b"not an index")
    out = _script(tmp_path, *SMALL, "--train-iters", "2", "--data-path", str(bad), "--expert-model-parallel-size", "1",
                  "--tokenizer-type", "NullTokenizer", "--vocab-size", "8000",
                  nproc=1)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "megahet error:" in lines[0] and "broken" in lines[0], out.stderr


def test_extra_flags_override_the_scripts_own(tmp_path):
    """--save DIR replaces the script's --save and --load (the run resumes from DIR, not the default)."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("iter_0000099\n")  # would break a --load of it
    mine = tmp_path / "mine"
    out = _script(tmp_path, *SMALL, "--train-iters", "3", "--mock-data", "--save", str(mine),
                  "--metrics-file", str(tmp_path / "m.jsonl"), "--expert-model-parallel-size", "1", nproc=1)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (mine / "latest").read_text().strip() == "iter_0000003"
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 3


def test_missing_tokenizer_model_is_an_error_even_with_mock_data(tmp_path):
    out = _script(tmp_path, "--mock-data", "--tokenizer-model", str(tmp_path / "nope.model"), nproc=1, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == (
        f"megahet error: --tokenizer-model {tmp_path / 'nope.model'} does not exist; pass an existing file or directory")
