"""Named wall-clock timers for the training loop (forward, backward, optimizer, ...).

Device work is asynchronous, so each start and stop first calls the backend's `synchronize` (passed in,
never a vendor call here); without it a timer would measure only the kernel launches.
"""
import time
from typing import Callable


class Timer:
    """One timer; accumulates the time between start/stop pairs until read with reset."""

    def __init__(self, name: str, synchronize: Callable[[], None]):
        self.name = name
        self._synchronize = synchronize
        self._elapsed = 0.0
        self._started_at: float | None = None
        self.count = 0  # completed start/stop pairs since the last reset

    @property
    def running(self) -> bool:
        return self._started_at is not None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"timer {self.name!r} started twice without stop")
        self._synchronize()
        self._started_at = time.perf_counter()

    def stop(self) -> None:
        if not self.running:
            raise RuntimeError(f"timer {self.name!r} stopped without start")
        self._synchronize()
        self._elapsed += time.perf_counter() - self._started_at
        self._started_at = None
        self.count += 1

    def reset(self) -> None:
        """Zero the total; a running timer keeps running from now."""
        self._elapsed = 0.0
        self.count = 0
        if self.running:
            self._started_at = time.perf_counter()

    def elapsed(self, reset: bool = True) -> float:
        """Seconds accumulated (a running timer includes its current interval and keeps running)."""
        total = self._elapsed
        if self.running:
            self._synchronize()
            total += time.perf_counter() - self._started_at
        if reset:
            self.reset()
        return total


class Timers:
    """A set of named timers created on first use: `timers("forward").start()`.

    Args:
        synchronize: waits for queued device work (e.g. `backend.synchronize`); None for host-only.
    """

    def __init__(self, synchronize: Callable[[], None] | None = None):
        self._synchronize = synchronize or (lambda: None)
        self._timers: dict[str, Timer] = {}

    def __call__(self, name: str) -> Timer:
        if name not in self._timers:
            self._timers[name] = Timer(name, self._synchronize)
        return self._timers[name]

    def __contains__(self, name: str) -> bool:
        return name in self._timers

    @property
    def names(self) -> list[str]:
        return list(self._timers)

    def start(self, name: str) -> None:
        self(name).start()

    def stop(self, name: str) -> None:
        self(name).stop()

    def elapsed(self, name: str, reset: bool = True) -> float:
        return self(name).elapsed(reset=reset)

    def reset(self, name: str | None = None) -> None:
        """Reset one timer, or all of them when `name` is None."""
        for timer in ([self(name)] if name is not None else self._timers.values()):
            timer.reset()

    def elapsed_all(self, names: list[str] | None = None, reset: bool = True,
                    normalizer: float = 1.0) -> dict[str, float]:
        """Seconds per timer divided by `normalizer` (e.g. iterations since the last read)."""
        names = self.names if names is None else names
        return {n: self.elapsed(n, reset=reset) / normalizer for n in names if n in self._timers}

    def log_string(self, names: list[str] | None = None, reset: bool = True,
                   normalizer: float = 1.0) -> str:
        """'forward: 12.34 | backward: 20.00' in milliseconds, for a console line."""
        times = self.elapsed_all(names, reset=reset, normalizer=normalizer)
        return " | ".join(f"{n}: {t * 1000.0:.2f}" for n, t in times.items())
