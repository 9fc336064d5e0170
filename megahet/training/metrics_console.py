"""The Megatron-like one-line console summary of a logged iteration.

Built from whatever keys the values dict has, in a fixed order, so a run without (say) MoE or memory
stats simply shows fewer fields.
"""
import math

# (values key, label, format) in display order; the format takes the float value.
_FIELDS = (
    ("consumed_samples", "consumed samples", lambda v: f"{int(v)}"),
    ("step_time_s", "elapsed time per iteration (ms)", lambda v: f"{v * 1000.0:.1f}"),
    ("tokens_per_s", "tokens/s", lambda v: f"{v:.0f}"),
    ("tflops_per_device", "TFLOP/s/device", lambda v: f"{v:.3f}"),
    ("mfu", "MFU", lambda v: f"{v * 100.0:.1f}%"),
    ("lr", "learning rate", lambda v: f"{v:.3E}"),
    ("loss", "lm loss", lambda v: f"{v:.4E}"),
    ("valid_loss", "validation loss", lambda v: f"{v:.4E}"),
    ("moe_aux_loss", "moe aux loss", lambda v: f"{v:.4E}"),
    ("moe_z_loss", "moe z loss", lambda v: f"{v:.4E}"),
    ("moe_load_imbalance", "moe max load/mean", lambda v: f"{v:.2f}"),
    ("loss_scale", "loss scale", lambda v: f"{v:.1f}"),
    ("grad_norm", "grad norm", lambda v: f"{v:.3f}"),
    ("skipped_iters", "skipped", lambda v: f"{int(v)}"),
    ("nan_iters", "nan iterations", lambda v: f"{int(v)}"),
)


def format_duration(seconds: float) -> str:
    """HH:MM:SS (hours may exceed 24); '--:--:--' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--:--"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _number(value) -> float | None:
    """The value as a float, or None if it is not a plain number (bool, str, list, dict, None)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def format_console_line(iteration: int, train_iters: int | None, values: dict, elapsed_s: float,
                        eta_s: float | None) -> str:
    """' iteration   20/ 300 | consumed samples: 640 | ... | elapsed: 00:01:02 | ETA: 00:03:00'.

    `values` holds plain Python numbers (see metrics.to_plain); unknown keys are not shown here.
    """
    if train_iters:
        width = len(str(train_iters)) + 1
        parts = [f" iteration {iteration:>{width}d}/{train_iters:>{width}d}"]
    else:
        parts = [f" iteration {iteration}"]
    for key, label, fmt in _FIELDS:
        value = _number(values.get(key))
        if value is not None:
            parts.append(f"{label}: {fmt(value) if math.isfinite(value) else value}")
    allocated, peak = _number(values.get("mem_allocated_gb")), _number(values.get("mem_peak_gb"))
    if allocated is not None or peak is not None:
        shown = [f"{v:.1f}" for v in (allocated, peak) if v is not None]
        parts.append(f"mem (GB): {'/'.join(shown)}")
    parts.append(f"elapsed: {format_duration(elapsed_s)}")
    if eta_s is not None:
        parts.append(f"ETA: {format_duration(eta_s)}")
    return " | ".join(parts)
