"""TensorBoard sink for MetricsLogger: SummaryWriter imported lazily; a missing package only warns."""
import json
import logging
import os

logger = logging.getLogger(__name__)


class TensorboardSink:
    """Writes every scalar with add_scalar and long lists as histograms; `active` is False when
    tensorboard is missing."""

    def __init__(self, log_dir: str, config: dict):
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # ImportError when tensorboard is absent; never fatal
            logger.warning("--tensorboard-dir is set but tensorboard is unavailable (%s); "
                           "pip install tensorboard (continuing without it)", exc)
            return
        os.makedirs(log_dir, exist_ok=True)
        self._writer = SummaryWriter(log_dir=log_dir)
        if config:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            self._writer.add_text("config", f"```\n{text}\n```", 0)

    @property
    def active(self) -> bool:
        return self._writer is not None

    def log(self, iteration: int, scalars: dict[str, float], series: dict[str, list[float]]) -> None:
        if self._writer is None:
            return
        import numpy as np

        for key, value in scalars.items():
            self._writer.add_scalar(key, value, iteration)
        for key, values in series.items():
            self._writer.add_histogram(key, np.asarray(values, dtype=np.float64), iteration)
        self._writer.flush()

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
