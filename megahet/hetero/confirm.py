"""`tools/plan.py --confirm N`: run the N best predicted plans for a few steps here; keep the fastest.

Only for clusters present on this machine (cpu and sim groups): each candidate is written as a plan
file and trained with torchrun on mock data; the median step time after two warm-up steps decides.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from typing import List, Sequence

from megahet.errors import MegahetError
from megahet.hetero.plan_io import write_plan
from megahet.hetero.planner import Result

log = logging.getLogger("megahet")

_LOCAL = ("cpu", "sim")


def measure_plan(plan: dict, cluster_path: str, world: int, flags: Sequence[str], iters: int = 5,
                 port: int = 29680, recompute=None) -> float:
    """Median step time (s) of `plan` trained for `iters` steps with torchrun on this machine."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    with tempfile.TemporaryDirectory() as tmp:
        plan_path, metrics = os.path.join(tmp, "plan.yaml"), os.path.join(tmp, "m.jsonl")
        write_plan(plan, plan_path)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(port),
               os.path.join(root, "examples", "pretrain_gpt.py"), *flags, "--cluster", cluster_path, "--plan", plan_path,
               "--mock-data", "--train-iters", str(iters), "--log-interval", "1", "--eval-interval", "1000000",
               "--metrics-file", metrics]
        if recompute:
            cmd += ["--recompute-granularity", recompute]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise MegahetError(f"--confirm: a candidate plan failed to train ({last}); run tools/plan.py --output and "
                               f"train it by hand to see why")
        with open(metrics) as fh:
            steps: List[float] = [json.loads(line)["step_time_s"] for line in fh]
    return statistics.median(steps[2:] if len(steps) > 3 else steps)


def confirm(res: Result, cluster, cluster_path: str, flags: Sequence[str], n: int, iters: int = 5) -> Result:
    """Measure the top `n` alternatives of `res`; return `res` re-pointed at the fastest measured one."""
    if any(g.backend not in _LOCAL for g in cluster.groups):
        raise MegahetError("--confirm runs the candidates here, so every cluster group must be cpu or sim; plan "
                           "without --confirm for devices this machine does not have")
    world = sum(g.devices for g in cluster.groups)
    best = None
    for i, (plan, pred, cand) in enumerate(res.alternatives[:n]):
        measured = measure_plan(plan, cluster_path, world, flags, iters, 29680 + i, cand.recompute)
        log.warning("confirm %d/%d: %s predicted %.3f s, measured %.3f s", i + 1, min(n, len(res.alternatives)),
                    cand.describe(), pred.step_time_s, measured)
        if best is None or measured < best[0]:
            best = (measured, plan, pred, cand)
    if best is not None:
        _, res.plan, res.prediction, res.candidate = best
        res.plan.setdefault("predicted", {})["measured_step_time_s"] = round(best[0], 6)
        res.options.recompute = best[3].recompute
    return res
