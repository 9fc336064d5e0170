"""Per-stage compute, idle and bridge time of a step, so an imbalanced plan is visible while training.

Every rank times its compute (forward/backward actions of the pipeline schedule, including a sim
device's slowdown) and reads its link counters (bytes and waiting time on cross-domain messages).
At a logging step one all-gather over the world group brings every rank's numbers to every rank;
each stage reports the slowest of its ranks. Idle is the step time not spent computing (pipeline
bubbles, waiting on peers and on gradient reductions).
"""
from __future__ import annotations

import time
from typing import Dict, List

import torch

_COMPUTE = ("fwd", "bwd")


class StageTimer:
    """A schedule tracer (begin/end per action) that sums this rank's compute time."""

    def __init__(self, inner=None):
        self.inner = inner  # another tracer to forward to (the --timing-trace recorder)
        self.compute_s = 0.0
        self._open: Dict[object, float] = {}

    def begin(self, action) -> None:
        self._open[action] = time.perf_counter()
        if self.inner is not None:
            self.inner.begin(action)

    def end(self, action) -> None:
        start = self._open.pop(action)
        if action.op in _COMPUTE:
            self.compute_s += time.perf_counter() - start
        if self.inner is not None:
            self.inner.end(action)


class StageStats:
    """Accumulates this rank's numbers between logging steps; `collect` is a collective (all ranks)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.compute_s = self.step_s = 0.0
        self._bytes0 = ctx.counters.bridge_bytes
        self._bridge_s0 = ctx.counters.bridge_s

    def add(self, timer: StageTimer, step_time_s: float) -> None:
        self.compute_s += timer.compute_s
        self.step_s += step_time_s

    def collect(self) -> dict:
        """{'stages': {'stage0': {compute_s, idle_s, bridge_s}, ...}, 'bridge_bytes', 'rank_bridge_bytes'}."""
        ctx, c = self.ctx, self.ctx.counters
        mine = torch.tensor([ctx.pp_rank, self.compute_s, max(self.step_s - self.compute_s, 0.0),
                             c.bridge_s - self._bridge_s0, c.bridge_bytes - self._bytes0],
                            dtype=torch.float64, device=ctx.world_group.device)  # [5]
        rows: List[List[float]] = ctx.world_group.all_gather(mine.unsqueeze(0), dim=0).cpu().tolist()
        stages: Dict[str, Dict[str, float]] = {}
        for stage, compute, idle, bridge_s, _ in rows:
            s = stages.setdefault(f"stage{int(stage)}", {"compute_s": 0.0, "idle_s": 0.0, "bridge_s": 0.0})
            s["compute_s"] = max(s["compute_s"], compute)
            s["idle_s"] = max(s["idle_s"], idle)
            s["bridge_s"] = max(s["bridge_s"], bridge_s)
        self.compute_s = self.step_s = 0.0
        self._bytes0, self._bridge_s0 = c.bridge_bytes, c.bridge_s
        return {"stages": dict(sorted(stages.items(), key=lambda kv: int(kv[0][5:]))),
                "bridge_bytes": int(sum(r[4] for r in rows)), "rank_bridge_bytes": [int(r[4]) for r in rows]}


def format_stage_line(stats: dict) -> str:
    """' stage 0: compute 0.120s idle 0.030s bridge 0.010s | stage 1: ...' for the console."""
    parts = [f"{name.replace('stage', 'stage ')}: compute {v['compute_s']:.3f}s idle {v['idle_s']:.3f}s "
             f"bridge {v['bridge_s']:.3f}s" for name, v in stats["stages"].items()]
    return " " + " | ".join(parts) + f" | bridged {stats['bridge_bytes'] / 1e6:.2f} MB"
