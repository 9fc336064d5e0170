"""Learning-rate schedule with Megatron semantics: linear warmup from 0, then decay to --min-lr.

The schedule is a pure function of the step count (`get_lr`), so resuming from a checkpoint only needs
the step count back; the state dict holds plain ints, floats and strings so it can go into JSON.
"""
import logging
import math

from megahet.errors import MegahetError

logger = logging.getLogger(__name__)

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine")


class LRScheduler:
    """Sets the learning rate of every optimizer param group once per step.

    Args:
        optimizer: any object with `param_groups` (list of dicts); a group's optional `lr_mult`
            scales its learning rate (e.g. a smaller rate for embeddings).
        max_lr: peak learning rate (--lr), reached at the end of warmup.
        min_lr: floor reached at `decay_steps` and held afterwards (--min-lr).
        warmup_steps: linear warmup length; lr = max_lr * step / warmup_steps (--lr-warmup-iters).
        decay_steps: step at which the decay reaches min_lr (--lr-decay-iters).
        decay_style: "constant", "linear", "cosine", "inverse-square-root" or "WSD" (--lr-decay-style).
        wsd_decay_steps: WSD only: length of the final annealing phase (--lr-wsd-decay-iters).
        wsd_decay_style: WSD only: annealing shape, "linear" or "cosine" (--lr-wsd-decay-style).

    The constructor sets the step-0 learning rate on the groups (0 when warming up), like Megatron; call
    `step()` after each optimizer step.
    """

    def __init__(self, optimizer, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                 decay_style: str = "cosine", wsd_decay_steps: int | None = None,
                 wsd_decay_style: str = "linear"):
        self.optimizer = optimizer
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)
        self.decay_style = decay_style
        self.wsd_decay_steps = None if wsd_decay_steps is None else int(wsd_decay_steps)
        self.wsd_decay_style = wsd_decay_style
        self._validate()
        self.num_steps = 0
        self._apply(self.get_lr(0))

    def _validate(self) -> None:
        if self.decay_style not in DECAY_STYLES:
            raise MegahetError(f"--lr-decay-style {self.decay_style!r} is unknown; use one of "
                               f"{', '.join(DECAY_STYLES)}")
        if not (math.isfinite(self.max_lr) and self.max_lr >= 0):
            raise MegahetError(f"--lr {self.max_lr} must be a finite number >= 0")
        if not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            raise MegahetError(f"--min-lr {self.min_lr} must be a finite number >= 0")
        if self.min_lr > self.max_lr:
            raise MegahetError(f"--min-lr {self.min_lr} is above --lr {self.max_lr}; lower --min-lr "
                               f"or raise --lr")
        if self.warmup_steps < 0:
            raise MegahetError(f"--lr-warmup-iters {self.warmup_steps} must be >= 0")
        if self.decay_style == "constant":
            return
        if self.decay_steps < 1:
            raise MegahetError(f"--lr-decay-iters {self.decay_steps} must be >= 1 for "
                               f"--lr-decay-style {self.decay_style}")
        if self.warmup_steps > self.decay_steps:
            raise MegahetError(f"--lr-warmup-iters {self.warmup_steps} exceeds --lr-decay-iters "
                               f"{self.decay_steps}; shorten the warmup or lengthen the decay")
        if self.decay_style == "WSD":
            self._validate_wsd()

    def _validate_wsd(self) -> None:
        if self.wsd_decay_style not in WSD_DECAY_STYLES:
            raise MegahetError(f"--lr-wsd-decay-style {self.wsd_decay_style!r} is unknown; use one of "
                               f"{', '.join(WSD_DECAY_STYLES)}")
        room = self.decay_steps - self.warmup_steps
        if self.wsd_decay_steps is None or not 1 <= self.wsd_decay_steps <= room:
            raise MegahetError(f"--lr-wsd-decay-iters {self.wsd_decay_steps} must be between 1 and "
                               f"--lr-decay-iters minus --lr-warmup-iters ({room}) for WSD")

    def get_lr(self, step: int) -> float:
        """Learning rate at `step` (before any `lr_mult`); a pure function of the step."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.max_lr * step / self.warmup_steps
        if self.decay_style == "constant":
            return self.max_lr
        if step > self.decay_steps:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            lr = self.max_lr * math.sqrt(max(self.warmup_steps, 1)) / math.sqrt(max(step, 1))
            return max(self.min_lr, lr)
        coeff = self._decay_coeff(step)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _decay_coeff(self, step: int) -> float:
        """Fraction of (max_lr - min_lr) kept at `step`, for warmup_steps < step <= decay_steps."""
        if self.decay_style == "WSD":
            anneal_start = self.decay_steps - self.wsd_decay_steps
            if step <= anneal_start:
                return 1.0
            ratio = (step - anneal_start) / self.wsd_decay_steps
            style = self.wsd_decay_style
        else:
            ratio = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
            style = self.decay_style
        if style == "linear":
            return 1.0 - ratio
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)  # cosine

    @property
    def lr(self) -> float:
        """Learning rate at the current step (before any `lr_mult`)."""
        return self.get_lr(self.num_steps)

    def step(self, increment: int = 1) -> float:
        """Advance `increment` steps, set every group's lr, and return the new base lr."""
        self.num_steps += increment
        lr = self.get_lr(self.num_steps)
        self._apply(lr)
        return lr

    def _apply(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def state_dict(self) -> dict:
        """Plain JSON-serialisable state: the step count plus the settings, for checking on resume."""
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps,
                "decay_style": self.decay_style, "wsd_decay_steps": self.wsd_decay_steps,
                "wsd_decay_style": self.wsd_decay_style}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count. This run's settings win over the checkpoint's (so a resumed run may
        extend --train-iters); differences are logged."""
        if not isinstance(state, dict) or not isinstance(state.get("num_steps"), int):
            raise MegahetError("the checkpoint's lr scheduler state has no integer num_steps; "
                               "check --load points at a megahet checkpoint")
        mine = self.state_dict()
        changed = [f"{k}: {state[k]!r} -> {mine[k]!r}" for k in mine
                   if k != "num_steps" and k in state and state[k] != mine[k]]
        if changed:
            logger.warning("lr schedule differs from the checkpoint's; using this run's: %s",
                           "; ".join(changed))
        self.num_steps = state["num_steps"]
        self._apply(self.get_lr(self.num_steps))
