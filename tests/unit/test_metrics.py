"""MetricsLogger sinks (console, JSONL, wandb offline, TensorBoard), helpers, and Timers."""
import glob
import json
import logging
import math
import os
import sys
import time

import pytest
import torch

from megahet.training.metrics import (REQUIRED_KEYS, MetricsLogger, flatten_numbers,
                                      format_duration, to_plain)
from megahet.training.metrics_wandb import wandb_mode
from megahet.training.timers import Timers

VALUES = {"loss": torch.tensor(5.123), "lr": 2e-4, "grad_norm": 1.234, "tokens_per_s": 12345.6,
          "step_time_s": 0.1234, "consumed_samples": 640, "moe_aux_loss": 0.0125,
          "skipped_iters": 0, "mem_allocated_gb": 1.2, "mem_peak_gb": 1.5}


def _logger(tmp_path, **kw):
    args = dict(rank=0, is_logging_rank=True, metrics_file=None, wandb_project=None,
                wandb_exp_name=None, wandb_save_dir=None, tensorboard_dir=None,
                config_dict={"train": {"train_iters": 300}, "model": {"num_experts": 4}})
    args.update(kw)
    return MetricsLogger(**args)


def test_jsonl_has_required_keys_and_stays_valid_json(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    with _logger(tmp_path, metrics_file=str(path)) as metrics:
        metrics.log(10, VALUES)
        metrics.log(20, dict(VALUES, loss=torch.tensor(float("nan")), grad_norm=float("inf"),
                             per_layer={"layer_0": torch.tensor([1, 2])}))
    with _logger(tmp_path, metrics_file=str(path)) as metrics:  # a resumed run appends
        metrics.log(30, VALUES)
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["iteration"] for r in records] == [10, 20, 30]
    for record in records:
        assert set(REQUIRED_KEYS) | {"moe_aux_loss"} <= set(record)
    assert records[0]["loss"] == pytest.approx(5.123, rel=1e-6)
    assert records[0]["consumed_samples"] == 640 and isinstance(records[0]["lr"], float)
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None  # NaN/Inf -> null
    assert records[1]["per_layer"] == {"layer_0": [1, 2]}


def test_non_logging_rank_writes_nothing(tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG, logger="megahet"):
        metrics = _logger(tmp_path, rank=3, is_logging_rank=False,
                          metrics_file=str(out / "m.jsonl"), tensorboard_dir=str(out / "tb"),
                          wandb_project="p", wandb_save_dir=str(out / "wandb"))
        metrics.log(1, {})
        metrics.close()
    assert not out.exists()
    assert caplog.records == []


def test_console_line_has_fields_and_eta(tmp_path, caplog):
    metrics = _logger(tmp_path)
    with caplog.at_level(logging.INFO, logger="megahet"):
        metrics.log(20, dict(VALUES, tflops_per_device=0.12, mfu=0.031))
        metrics.log(21, {"loss": 4.0})  # sparse values: fields omitted, warning once
    first, second = [r.getMessage() for r in caplog.records if r.name == "megahet"]
    assert first.startswith(" iteration   20/ 300 | consumed samples: 640 | ")
    for part in ("elapsed time per iteration (ms): 123.4", "tokens/s: 12346",
                 "TFLOP/s/device: 0.120", "MFU: 3.1%", "learning rate: 2.000E-04",
                 "lm loss: 5.1230E+00", "moe aux loss: 1.2500E-02", "grad norm: 1.234",
                 "skipped: 0", "mem (GB): 1.2/1.5", "elapsed: 00:00:00",
                 "ETA: 00:00:35"):  # 280 iterations x 0.1234 s = 34.6 s
        assert part in first
    assert "lm loss: 4.0000E+00" in second and "grad norm" not in second
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "grad_norm" in warnings[0] and "moe_aux_loss" in warnings[0]


def test_helpers():
    assert format_duration(3723.4) == "01:02:03"
    assert format_duration(100 * 3600) == "100:00:00"
    assert format_duration(float("nan")) == "--:--:--"
    plain = to_plain({"a": torch.tensor([1.5, float("nan")]), "b": (True, None)}, finite_only=True)
    assert plain == {"a": [1.5, None], "b": [True, None]}
    scalars, series = flatten_numbers({"moe": {"layer_3": {"tokens_per_expert": [4, 6]},
                                               "layer_5": {"tokens_per_expert": list(range(64))}},
                                       "loss": 2.0, "name": "x"})
    assert scalars == {"moe/layer_3/tokens_per_expert/0": 4.0,
                       "moe/layer_3/tokens_per_expert/1": 6.0, "loss": 2.0}
    assert series == {"moe/layer_5/tokens_per_expert": [float(i) for i in range(64)]}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep wandb offline and inside tmp_path: no server, no writes to the home directory."""
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_wandb_mode_is_offline_without_credentials(wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(wandb_env / "netrc"))
    assert wandb_mode() == "offline"
    (wandb_env / "netrc").write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == "offline"


def test_wandb_offline_run_dir_created(wandb_env):
    pytest.importorskip("wandb")
    save_dir = wandb_env / "wb"
    metrics = _logger(wandb_env, wandb_project="megahet-test", wandb_exp_name="unit",
                      wandb_save_dir=str(save_dir))
    assert metrics._wandb is not None and metrics._wandb.active
    metrics.log(1, dict(VALUES, moe={"layer_0": {"tokens_per_expert": [3, 5]}}))
    metrics.close()
    runs = glob.glob(str(save_dir / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    assert glob.glob(os.path.join(runs[0], "*.wandb"))


def test_missing_wandb_only_warns(wandb_env, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    path = wandb_env / "m.jsonl"
    with caplog.at_level(logging.WARNING):
        metrics = _logger(wandb_env, wandb_project="p", metrics_file=str(path))
        metrics.log(1, VALUES)
        metrics.close()
    assert "wandb is not installed" in caplog.text
    assert json.loads(path.read_text())["iteration"] == 1


def test_tensorboard_event_file_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = tmp_path / "tb"
    metrics = _logger(tmp_path, tensorboard_dir=str(tb_dir))
    metrics.log(5, VALUES)
    metrics.log(6, dict(VALUES, loss=4.5))
    metrics.close()
    assert glob.glob(str(tb_dir / "events.out.tfevents.*"))
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    loss = events.Scalars("loss")
    assert [(e.step, round(e.value, 3)) for e in loss] == [(5, 5.123), (6, 4.5)]


def test_timers_accumulate_and_synchronize():
    calls = []
    timers = Timers(synchronize=lambda: calls.append(1))
    timers("fwd").start()
    time.sleep(0.02)
    timers.stop("fwd")
    assert len(calls) == 2 and timers("fwd").count == 1
    assert 0.015 < timers.elapsed("fwd", reset=False) < 1.0
    assert timers.elapsed("fwd") > 0.015 and timers.elapsed("fwd") == 0.0  # reset on read
    with pytest.raises(RuntimeError):
        timers.stop("fwd")
    timers.start("bwd")
    assert timers.log_string(["bwd", "nope"], reset=True).startswith("bwd: ")
    assert math.isclose(timers.elapsed_all(normalizer=2.0)["fwd"], 0.0)
