"""Training metrics to the console, a JSONL file (--metrics-file), wandb and TensorBoard.

Only the logging rank (the one that holds the loss) writes; every other rank gets a logger whose calls
do nothing, so the training loop can call it unconditionally.
"""
import dataclasses
import json
import logging
import math
import os
import time

from megahet.training.metrics_console import format_console_line, format_duration
from megahet.training.metrics_tensorboard import TensorboardSink
from megahet.training.metrics_wandb import WandbSink

__all__ = ["MetricsLogger", "REQUIRED_KEYS", "MOE_REQUIRED_KEYS", "format_duration", "to_plain",
           "flatten_numbers"]

logger = logging.getLogger(__name__)
console = logging.getLogger("megahet")

# Keys every --metrics-file line carries (design.md); `iteration` comes from log()'s argument.
REQUIRED_KEYS = ("iteration", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                 "consumed_samples")
MOE_REQUIRED_KEYS = ("moe_aux_loss",)
# Lists up to this length go to wandb/TensorBoard as one scalar per index; longer ones as histograms.
SMALL_LIST = 32


def to_plain(value, finite_only: bool = False):
    """Tensors, numpy values and containers as plain Python (dict/list/float/int/bool/str/None).

    With `finite_only`, NaN and +-Inf become None so the result is valid JSON.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays/scalars
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return None if finite_only and not math.isfinite(value) else value
    if isinstance(value, dict):
        return {str(k): to_plain(v, finite_only) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, finite_only) for v in value]
    return str(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float))


def flatten_numbers(values: dict) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Plain nested values -> ({"a/b": 1.0, "moe/layer_3/tokens_per_expert/0": 12.0}, {long lists}).

    Nested dict keys join with '/'; numeric lists up to SMALL_LIST long become one scalar per index,
    longer ones are returned separately (histograms); strings and None are dropped.
    """
    scalars: dict[str, float] = {}
    series: dict[str, list[float]] = {}

    def walk(key: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}/{k}" if key else str(k), v)
        elif isinstance(value, (list, tuple)):
            if len(value) > SMALL_LIST:
                if all(_is_number(v) for v in value):
                    series[key] = [float(v) for v in value]
                return
            for i, v in enumerate(value):
                walk(f"{key}/{i}", v)
        elif _is_number(value):
            scalars[key] = float(value)

    walk("", values)
    return scalars, series


def _find_key(tree, key: str):
    """First value of `key` in a nested config dict (breadth-first), or None."""
    level = [tree]
    while level:
        nxt = []
        for node in level:
            if isinstance(node, dict):
                if node.get(key) is not None:
                    return node[key]
                nxt.extend(v for v in node.values() if isinstance(v, dict))
        level = nxt
    return None


class MetricsLogger:
    """Logs one training iteration's values to every configured sink.

    Args:
        rank: this process's global rank (shown in warnings).
        is_logging_rank: only this rank writes anything (rank 0: the logged values are already
            reduced over the job, and it is the rank whose console logs at INFO).
        metrics_file: JSONL path (--metrics-file), appended to, one object per `log` call.
        wandb_project, wandb_exp_name, wandb_save_dir: --wandb-project / --wandb-exp-name /
            --wandb-save-dir; wandb is off when the project is None.
        tensorboard_dir: --tensorboard-dir; TensorBoard is off when None.
        config_dict: the run's config (dict or dataclass), given to wandb and TensorBoard.
        train_iters: total iterations, for the console's 'i/N' and ETA; None looks for `train_iters`
            in config_dict.
        moe: whether `moe_aux_loss` is required; None means "config_dict has num_experts".

    Values keys the console knows (others still go to the file, wandb and TensorBoard): see
    REQUIRED_KEYS plus tflops_per_device, mfu (fraction), moe_aux_loss, moe_z_loss, loss_scale,
    skipped_iters, nan_iters, mem_allocated_gb, mem_peak_gb.
    """

    def __init__(self, rank: int, is_logging_rank: bool, metrics_file: str | None,
                 wandb_project: str | None, wandb_exp_name: str | None, wandb_save_dir: str | None,
                 tensorboard_dir: str | None, config_dict: dict, train_iters: int | None = None,
                 moe: bool | None = None):
        self.rank = rank
        self.enabled = bool(is_logging_rank)
        config = to_plain(config_dict or {})
        self.train_iters = train_iters if train_iters is not None else _find_key(config,
                                                                               "train_iters")
        if moe is None:
            moe = bool(_find_key(config, "num_experts"))
        self.required = REQUIRED_KEYS + (MOE_REQUIRED_KEYS if moe else ())
        self._warned_missing: set[str] = set()
        self._start_time = time.monotonic()
        self._first: tuple[int, float] | None = None  # (iteration, time) of the first log call
        self._file = self._wandb = self._tensorboard = None
        if not self.enabled:
            return
        if metrics_file:
            parent = os.path.dirname(os.path.abspath(metrics_file))
            os.makedirs(parent, exist_ok=True)
            self._file = open(metrics_file, "a", encoding="utf-8")
        if wandb_project:
            self._wandb = WandbSink(wandb_project, wandb_exp_name, wandb_save_dir, config)
        if tensorboard_dir:
            self._tensorboard = TensorboardSink(tensorboard_dir, config)

    def log(self, iteration: int, values: dict) -> None:
        """Write one iteration's values (numbers, tensors, nested dicts/lists) everywhere."""
        if not self.enabled:
            return
        self._warn_missing(values)
        plain = to_plain(values)
        now = time.monotonic()
        elapsed = now - self._start_time
        console.info(format_console_line(iteration, self.train_iters, plain, elapsed,
                                         self._eta(iteration, plain.get("step_time_s"), now)))
        if self._file is not None:
            record = {"iteration": iteration, **to_plain(values, finite_only=True)}
            record["iteration"] = iteration  # the argument wins over a stray values key
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
        if self._wandb is not None or self._tensorboard is not None:
            scalars, series = flatten_numbers(plain)
            for sink in (self._wandb, self._tensorboard):
                if sink is not None:
                    sink.log(iteration, scalars, series)

    def _warn_missing(self, values: dict) -> None:
        missing = [k for k in self.required
                   if k != "iteration" and k not in values and k not in self._warned_missing]
        if missing:
            self._warned_missing.update(missing)
            logger.warning("rank %d: metrics lack required key(s) %s (design.md --metrics-file)",
                           self.rank, ", ".join(missing))

    def _eta(self, iteration: int, step_time_s, now: float) -> float | None:
        """Seconds left: remaining iterations x the logged step time, else the average rate since
        the first log call (which works after a resume too)."""
        if self._first is None:
            self._first = (iteration, now)
        if not self.train_iters:
            return None
        remaining = max(self.train_iters - iteration, 0)
        if isinstance(step_time_s, (int, float)) and math.isfinite(step_time_s) and step_time_s > 0:
            return remaining * step_time_s
        first_iteration, first_time = self._first
        if iteration > first_iteration:
            return remaining * (now - first_time) / (iteration - first_iteration)
        return None

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        file, self._file = self._file, None
        if file is not None:
            file.close()
        for sink in (self._wandb, self._tensorboard):
            if sink is not None:
                sink.close()
        self._wandb = self._tensorboard = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
