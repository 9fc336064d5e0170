"""Loss scaling for fp16 training (Megatron semantics); state dicts are plain floats and ints.

fp16 gradients underflow without scaling. The dynamic scaler grows the scale after `growth_interval`
clean steps and backs off after `hysteresis` steps with inf/nan gradients. The found-inf flag comes
from the optimizer, already agreed across all ranks, so every rank applies the same update.
"""
import math

from megahet.errors import MegahetError


class ConstantLossScaler:
    """A fixed loss scale (--loss-scale); `update` does nothing. Scale 1.0 means no scaling."""

    dynamic = False

    def __init__(self, scale: float = 1.0):
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise MegahetError(f"--loss-scale {scale} must be a finite number > 0")
        self._scale = scale

    @property
    def scale(self) -> float:
        return self._scale

    def update(self, found_inf: bool) -> None:
        """A constant scale ignores overflow; the optimizer still skips the step."""

    def state_dict(self) -> dict:
        return {"scale": self._scale}

    def load_state_dict(self, state: dict) -> None:
        """Keep this run's --loss-scale: a constant scale is a setting, not training state."""


class DynamicLossScaler:
    """Megatron's DynamicGradScaler on the host (the flag is a bool, the scale a Python float).

    Args:
        initial_scale: starting scale (--initial-loss-scale).
        min_scale: floor for back-off (--min-loss-scale).
        growth_interval: clean steps between growths (--loss-scale-window).
        hysteresis: overflowing steps tolerated before backing off (--hysteresis); only a growth
            resets it, as in Megatron.
        backoff: factor applied on back-off, in (0, 1).
        growth: factor applied on growth, > 1.
    """

    dynamic = True

    def __init__(self, initial_scale: float = 2.0 ** 16, min_scale: float = 1.0,
                 growth_interval: int = 1000, hysteresis: int = 2, backoff: float = 0.5,
                 growth: float = 2.0):
        self.min_scale = float(min_scale)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.backoff = float(backoff)
        self.growth = float(growth)
        initial_scale = float(initial_scale)
        if not (math.isfinite(initial_scale) and initial_scale > 0):
            raise MegahetError(f"--initial-loss-scale {initial_scale} must be a finite number > 0")
        if not (self.min_scale > 0 and self.min_scale <= initial_scale):
            raise MegahetError(f"--min-loss-scale {self.min_scale} must be > 0 and at most "
                               f"--initial-loss-scale {initial_scale}")
        if self.growth_interval < 1:
            raise MegahetError(f"--loss-scale-window {self.growth_interval} must be >= 1")
        if self.hysteresis < 1:
            raise MegahetError(f"--hysteresis {self.hysteresis} must be >= 1")
        if not 0 < self.backoff < 1:
            raise MegahetError(f"loss scaler backoff {self.backoff} must be in (0, 1)")
        if not self.growth > 1:
            raise MegahetError(f"loss scaler growth {self.growth} must be > 1")
        self._scale = initial_scale
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    @property
    def scale(self) -> float:
        return self._scale

    def update(self, found_inf: bool) -> None:
        """Advance one step given whether any gradient (on any rank) was inf/nan."""
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = max(self._scale * self.backoff, self.min_scale)
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            self._scale *= self.growth

    def state_dict(self) -> dict:
        return {"scale": self._scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        try:
            scale = float(state["scale"])
            growth_tracker = int(state["growth_tracker"])
            hysteresis_tracker = int(state["hysteresis_tracker"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MegahetError(f"the checkpoint's loss scaler state is unreadable ({exc!r}); check "
                               f"--load points at a megahet fp16 checkpoint") from None
        self._scale = max(scale, self.min_scale)
        self._growth_tracker = growth_tracker
        self._hysteresis_tracker = hysteresis_tracker


def build_loss_scaler(fp16: bool, loss_scale: float | None = None, initial_scale: float = 2.0 ** 16,
                      min_scale: float = 1.0, growth_interval: int = 1000, hysteresis: int = 2):
    """Pick the scaler like Megatron: bf16/fp32 -> constant 1.0; fp16 -> --loss-scale if given,
    otherwise dynamic."""
    if not fp16:
        return ConstantLossScaler(1.0)
    if loss_scale is not None:
        return ConstantLossScaler(loss_scale)
    return DynamicLossScaler(initial_scale, min_scale, growth_interval, hysteresis)
