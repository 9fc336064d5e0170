"""Weights & Biases sink for MetricsLogger: imported lazily, offline unless credentials exist.

A training job must never block on (or leak to) the network by accident, so the run is offline unless
an API key is configured (WANDB_API_KEY or a `wandb login` netrc entry); WANDB_MODE=offline/disabled
still wins. A missing or failing wandb costs one warning, never the training run.
"""
import logging
import netrc
import os
from urllib.parse import urlparse

logger = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    """True when WANDB_API_KEY is set or the netrc file has an entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host or "api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """The mode passed to wandb.init: WANDB_MODE offline/disabled if set, else online only with
    credentials."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_wandb_credentials() else "offline"


class WandbSink:
    """One wandb run; `active` is False when wandb is missing or failed to start."""

    def __init__(self, project: str, name: str | None, save_dir: str | None, config: dict):
        self._run = None
        self._wandb = None
        try:
            import wandb
        except ImportError:
            logger.warning("--wandb-project is set but wandb is not installed; pip install wandb "
                           "(continuing without wandb)")
            return
        except Exception as exc:  # a broken install must not stop training
            logger.warning("--wandb-project is set but importing wandb failed (%r); continuing "
                           "without wandb", exc)
            return
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        mode = wandb_mode()
        try:
            self._run = wandb.init(project=project, name=name, dir=save_dir, config=config,
                                   mode=mode)
        except Exception as exc:  # wandb raises many types (auth, network, settings)
            logger.warning("wandb.init failed (%r); continuing without wandb "
                           "(check --wandb-project / --wandb-save-dir)", exc)
            return
        self._wandb = wandb
        logger.info("wandb run started in %s mode", mode)

    @property
    def active(self) -> bool:
        return self._run is not None

    @property
    def run_dir(self) -> str | None:
        """The local directory of the run (where offline runs wait for `wandb sync`)."""
        return getattr(self._run, "dir", None) if self._run is not None else None

    def log(self, iteration: int, scalars: dict[str, float], series: dict[str, list[float]]) -> None:
        """Log flat scalars; long lists become histograms."""
        if self._run is None:
            return
        data = dict(scalars)
        try:
            data.update({key: self._wandb.Histogram(values) for key, values in series.items()})
            self._run.log(data, step=iteration)
        except Exception as exc:
            logger.warning("wandb.log failed (%r); disabling wandb for this run", exc)
            self.close()

    def close(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish()
            except Exception as exc:
                logger.warning("wandb finish failed (%r)", exc)
