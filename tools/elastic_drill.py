"""Elastic drill: a cpu + sim job under torchrun elastic (two agents, `--nnodes=1:2`) loses its sim node.

The sim agent and its worker are SIGKILLed mid-run; the cpu worker's next collective fails (one-line
error naming the rank that never arrived), its agent restarts it, torchrun re-rendezvous with the one
node left, and `--elastic` re-plans for the cpu group alone and resumes from the newest checkpoint.
Compared with an uninterrupted run of both groups: every iteration after the restart must see the
same consumed samples, and the losses must agree to floating-point reduction order (the plans
differ, so the sums run in another order).

    python tools/elastic_drill.py [--iters 40 --kill-after 12 --out DIR]

Prints one JSON line (restart iteration, seconds lost to the restart, max relative loss difference,
whether the data order matched); exit status 0 only when the run finished on one rank, the samples
matched and the losses agreed within --tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from megahet.testing import free_port
from restart_drill import children  # tools/ is this script's directory: sys.path[0]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--mock-data", "--vocab-size", "128", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "3e-3", "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval", "0", "--seed", "11",
        "--distributed-timeout-s", "10", "--save-interval", "5", "--elastic"]
CLUSTER = "groups:\n  - {name: fast, backend: cpu, devices: 1}\n  - {name: slow, backend: sim, devices: 1, speed: 1.0}\n"


def agent(workdir: str, name: str, group: str, iters: int, port: int, tag: str) -> subprocess.Popen:
    """One torchrun agent ("node") with one worker of cluster group `group`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={tag}", "--max-restarts=3",
           "--monitor-interval=0.5", os.path.join(ROOT, "examples", "pretrain_gpt.py"), *TINY,
           "--train-iters", str(iters), "--cluster", os.path.join(workdir, "cluster.yaml"),
           "--save", os.path.join(workdir, f"{tag}_ck"), "--load", os.path.join(workdir, f"{tag}_ck"),
           "--metrics-file", os.path.join(workdir, f"{tag}.jsonl")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MEGAHET_DEVICE_GROUP=group)
    log = open(os.path.join(workdir, f"{tag}_{name}.log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def records(path: str) -> list:
    out = []
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "loss" in rec:
                    out.append(rec)
    except OSError:
        pass
    return out


def run_pair(workdir: str, iters: int, tag: str, kill_after: int = 0) -> dict:
    """Both agents; with kill_after, SIGKILL the sim agent and its worker once that many steps are logged."""
    port = free_port()
    fast = agent(workdir, "fast", "fast", iters, port, tag)
    time.sleep(2.0)  # the fast agent hosts the rendezvous store: it must outlive the sim node
    slow = agent(workdir, "slow", "slow", iters, port, tag)
    killed_at = resumed_at = None
    try:
        if kill_after:
            metrics = os.path.join(workdir, f"{tag}.jsonl")
            deadline = time.time() + 300
            while len(records(metrics)) < kill_after and time.time() < deadline and fast.poll() is None:
                time.sleep(0.02)
            killed_at = time.time()
            for pid in [*children(slow.pid), slow.pid]:
                os.kill(pid, signal.SIGKILL)
            while resumed_at is None and fast.poll() is None:  # the first step of the re-planned run
                its = [r["iteration"] for r in records(metrics)]
                if any(b <= a for a, b in zip(its, its[1:])):
                    resumed_at = time.time()
                time.sleep(0.05)
        rc = fast.wait(timeout=600)
    finally:
        for p in (fast, slow):
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"rc": rc, "seconds_to_resume": round(resumed_at - killed_at, 1) if resumed_at else None}


def drill(workdir: str, iters: int, kill_after: int, tolerance: float) -> dict:
    with open(os.path.join(workdir, "cluster.yaml"), "w") as fh:
        fh.write(CLUSTER)
    run_pair(workdir, iters, "ref")
    t0 = time.time()
    got = run_pair(workdir, iters, "drill", kill_after)
    ref = {r["iteration"]: r for r in records(os.path.join(workdir, "ref.jsonl"))}
    recs = records(os.path.join(workdir, "drill.jsonl"))
    # The restarted generation logs from the checkpoint's iteration on; its records are the last ones.
    restart = next((i for i in range(1, len(recs)) if recs[i]["iteration"] <= recs[i - 1]["iteration"]), None)
    after = recs[restart:] if restart is not None else []
    rel = [abs(r["loss"] - ref[r["iteration"]]["loss"]) / abs(ref[r["iteration"]]["loss"]) for r in after
           if r["iteration"] in ref]
    samples_ok = bool(after) and all(r["consumed_samples"] == ref[r["iteration"]]["consumed_samples"] for r in after)
    replanned = None
    if after:
        with open(os.path.join(workdir, "drill_fast.log")) as fh:
            text = fh.read()
        replanned = "megahet: elastic: lost 'slow'" in text
    return {"exit_code": got["rc"], "killed_after_iteration": recs[restart - 1]["iteration"] if restart else None,
            "resumed_from_iteration": after[0]["iteration"] - 1 if after else None,
            "iterations_after_restart": len(after), "replica_samples_after": after[-1].get("replica_samples") if after else None,
            "replanned": replanned, "samples_identical": samples_ok,
            "max_relative_loss_difference": max(rel) if rel else None,
            "seconds_kill_to_first_step": got["seconds_to_resume"],
            "seconds": round(time.time() - t0, 1),
            "ok": got["rc"] == 0 and samples_ok and bool(rel) and max(rel) <= tolerance and bool(replanned)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--kill-after", type=int, default=12, help="logged steps before the sim node is killed")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest relative loss difference accepted")
    ap.add_argument("--out", default=None, help="keep logs and checkpoints here (default: a temp dir, removed)")
    args = ap.parse_args()
    workdir = args.out or tempfile.mkdtemp(prefix="megahet_elastic_")
    os.makedirs(workdir, exist_ok=True)
    try:
        res = drill(workdir, args.iters, args.kill_after, args.tolerance)
    finally:
        if args.out is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
