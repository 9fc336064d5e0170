"""Restart drill: kill -9 a training rank at random moments; torchrun restarts the job, which resumes from
the newest complete checkpoint. Passes when the final weights, optimizer state and every logged loss
are bit-identical to an uninterrupted run.

A reference job runs first without kills. Then the same job runs under `torchrun --max-restarts`, and
this script repeatedly waits for a fresh generation of workers, sleeps a random time (so kills land in
start-up, loading, training steps and saves alike) and SIGKILLs one worker it launched (by pid).

    python tools/restart_drill.py [--kills 10 --world 2 --iters 60 --seed 0 --out DIR]

Prints one JSON line: kills done (how many after a trained step, how many while a `.partial` save
directory existed), seconds, and whether weights and losses matched.
Exit status 0 only when they did.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

from megahet.training.checkpoint_format import CheckpointReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--mock-data", "--vocab-size", "128", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "3e-3", "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval", "0", "--seed", "11",
        "--distributed-timeout-s", "60", "--save-interval", "1"]


def launch(workdir: str, name: str, world: int, iters: int, restarts: int) -> subprocess.Popen:
    ck, metrics = os.path.join(workdir, f"{name}_ck"), os.path.join(workdir, f"{name}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(world), "--max-restarts", str(restarts), "--monitor-interval", "0.2",
           os.path.join(ROOT, "examples", "pretrain_gpt.py"), *TINY, "--train-iters", str(iters),
           "--save", ck, "--load", ck, "--metrics-file", metrics]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(os.path.join(workdir, f"{name}.log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def children(pid: int) -> set:
    """Direct child pids of `pid` (the workers torchrun's agent started)."""
    out = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out.update(int(c) for c in fh.read().split())
    except OSError:
        pass
    return out


def records(path: str) -> int:
    try:
        with open(path) as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


def kill_loop(job: subprocess.Popen, kills: int, max_delay: float, rng: random.Random, metrics: str,
              ck: str) -> dict:
    """Kill one worker of each new generation: half of the time after a random delay from its start
    (start-up, loading), otherwise once it has trained a step, a random fraction of a step later
    (steps and saves: the job saves every step). Returns counts of kills and of where they landed."""
    stats = {"kills": 0, "after_progress": 0, "during_save": 0}
    killed: set = set()
    while stats["kills"] < kills and job.poll() is None:
        workers = children(job.pid) - killed
        if not workers:
            time.sleep(0.05)
            continue
        in_training = rng.random() < 0.5
        if in_training:
            seen = records(metrics)
            deadline = time.time() + 120
            while records(metrics) == seen and job.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            # A step is logged just before its save: a short delay lands in the save, a longer one later.
            time.sleep(rng.uniform(0.0, 0.05) if rng.random() < 0.5 else rng.uniform(0.0, 0.3))
        else:
            time.sleep(rng.uniform(0.0, max_delay))
        alive = sorted(children(job.pid) & workers)
        if not alive or job.poll() is not None:
            continue
        try:
            os.kill(rng.choice(alive), signal.SIGKILL)
        except ProcessLookupError:
            continue
        saving = os.path.isdir(ck) and any(n.endswith(".partial") for n in os.listdir(ck))
        killed |= children(job.pid) | set(alive)  # this generation is over: wait for the next one
        stats["kills"] += 1
        stats["after_progress"] += in_training
        stats["during_save"] += saving
    return stats


def losses_by_iteration(path: str) -> dict:
    out: dict = {}
    with open(path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by the kill
            if "loss" in rec:
                out.setdefault(rec["iteration"], []).append(rec["loss"])
    return out


def same_checkpoints(a: str, b: str) -> bool:
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    names = [n for n in ra.tensor_names("") if not n.startswith("rng/")]
    return (ra.meta["iteration"] == rb.meta["iteration"] and names == [n for n in rb.tensor_names("")
                                                                      if not n.startswith("rng/")]
            and all(torch.equal(ra.read(n), rb.read(n)) for n in names))


def drill(workdir: str, kills: int, world: int, iters: int, seed: int, max_delay: float) -> dict:
    ref = launch(workdir, "ref", world, iters, 0)
    if ref.wait() != 0:
        raise RuntimeError(f"the reference run failed; see {workdir}/ref.log")
    t0 = time.time()
    job = launch(workdir, "drill", world, iters, 2 * kills + 4)  # a loaded machine may fail a start-up by itself
    stats = kill_loop(job, kills, max_delay, random.Random(seed), os.path.join(workdir, "drill.jsonl"),
                      os.path.join(workdir, "drill_ck"))
    rc = job.wait()
    ref_losses, got = losses_by_iteration(os.path.join(workdir, "ref.jsonl")), \
        losses_by_iteration(os.path.join(workdir, "drill.jsonl"))
    losses_ok = (sorted(got) == sorted(ref_losses)
                 and all(v == ref_losses[i][:1] * len(v) for i, v in got.items()))
    weights_ok = rc == 0 and same_checkpoints(os.path.join(workdir, "ref_ck"), os.path.join(workdir, "drill_ck"))
    return {**stats, "exit_code": rc, "seconds": round(time.time() - t0, 1),
            "iterations_logged": sum(len(v) for v in got.values()), "losses_identical": losses_ok,
            "weights_identical": weights_ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=10.0, help="longest wait before a kill (s)")
    ap.add_argument("--out", default=None, help="keep logs and checkpoints here (default: a temp dir, removed)")
    args = ap.parse_args()
    workdir = args.out or tempfile.mkdtemp(prefix="megahet_restart_")
    os.makedirs(workdir, exist_ok=True)
    try:
        res = drill(workdir, args.kills, args.world, args.iters, args.seed, args.max_delay)
    finally:
        if args.out is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(res))
    return 0 if res["losses_identical"] and res["weights_identical"] and res["kills"] == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
