"""Simulated slower device: CPU compute in its own communication domain.

It lets a CPU-only machine run real heterogeneous jobs: ranks in a sim domain reach ranks in other
domains only through the host-staged bridge, and ``speed`` < 1 makes their compute slower so uneven
plans and pipeline bubbles show up in measured step times.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

from megahet.backends.cpu import CPUBackend
from megahet.errors import MegahetError


class SimBackend(CPUBackend):
    """CPU compute that waits (1/speed - 1) x each compute chunk, in domain ``domain``.

    Args:
        speed: fraction of this CPU's speed to simulate, in (0, 1].
        domain: communication domain name; give groups different names to make several sim domains.
        peak_tflops: peak TFLOP/s of the simulated device; when unset, measured CPU speed x speed.
        speed_file: a file holding a speed in (0, 1]; when it exists its value replaces `speed`, re-read
            when it changes, so a test can slow the device down (or speed it up) mid-run.
    """

    name = "sim"

    def __init__(self, speed: float = 1.0, domain: str = "sim", *,
                 peak_tflops: Optional[float] = None, speed_file: Optional[str] = None) -> None:
        super().__init__(peak_tflops=peak_tflops)
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 < speed <= 1:
            raise MegahetError(f"sim backend: speed={speed!r} must be in (0, 1] (a fraction of CPU "
                               "speed); a sim group can only be slower, so slow the other groups")
        if not isinstance(domain, str) or not domain:
            raise MegahetError(f"sim backend: domain={domain!r} must be a non-empty name such as 'sim'")
        self.speed = float(speed)
        self.domain = domain
        self.speed_file = speed_file
        self._speed_stamp = None  # (mtime_ns, size) of the speed file last read

    def __repr__(self) -> str:
        return f"SimBackend(speed={self.speed}, domain={self.domain!r})"

    def default_peak_flops(self, dtype: torch.dtype) -> float:
        return super().default_peak_flops(dtype) * self.speed

    def after_compute(self, elapsed_s: float) -> None:
        """Sleep (1/speed - 1) * elapsed_s so the chunk appears to have run at ``speed``."""
        if elapsed_s < 0:
            raise MegahetError(f"after_compute got a negative elapsed time {elapsed_s}: pass the "
                               "measured seconds of the compute chunk")
        if self.speed_file is not None:
            self._reload_speed()
        delay = (1.0 / self.speed - 1.0) * elapsed_s
        if delay > 0:
            time.sleep(delay)

    def _reload_speed(self) -> None:
        try:
            st = os.stat(self.speed_file)
        except OSError:
            return  # no file (yet): keep the configured speed
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._speed_stamp:
            return
        self._speed_stamp = stamp
        try:
            with open(self.speed_file) as fh:
                speed = float(fh.read().strip())
        except (OSError, ValueError):
            return  # being written: read it at the next chunk
        if not 0 < speed <= 1:
            raise MegahetError(f"sim backend: {self.speed_file} holds speed {speed}; write a number in (0, 1]")
        self.speed = speed
