"""Benchmark the heterogeneous runtime on this machine: bridge bandwidth and hand-balanced cpu+sim plans.

1. Bridged P2P: a cpu rank sends to a sim rank (another communication domain) through `Links`
   (host-staged gloo), against plain gloo send/recv of the same bytes between the same two processes.
   Both receive into a newly allocated tensor, as a pipeline must (the received activation is kept
   for backward).
2. Hierarchical all-reduce over cpu, cpu, sim, sim (native reduce-scatter in each domain, bridged
   exchange of shards, native all-gather), against one plain gloo all-reduce of the same tensor over
   the same four processes. Bandwidth = tensor bytes / time (algorithm bandwidth).
   Both pairs alternate inside one run, so machine load hits both sides alike.
3. Plans on a cpu(1) + sim(0.5) cluster, each measured by training a small 12-layer GPT for a few
   steps, balanced by hand the way an engineer balances a plan, from measurements:
   - calibration: each device trains alone on the nominal 2:1 work, then again on the split that gave
     (so both alone jobs last about as long); their throughputs give the data-parallel split
     (`--gbs` samples in micro-batches of 1) and the proportional layer share. Sharing this host
     with a cpu rank, sim(0.5) runs at about 0.4-0.5 of the CPU, not 0.5: its compute always
     overlaps the other rank's (memory bandwidth), while the cpu rank's overlaps the sim's only
     about half the time, the rest being the sim's idling;
   - the pipeline's layer split: the two splits nearest the proportional share are each tried in a
     run of `--iters` steps and the better balanced (median over its steps) is kept (the first stage
     also embeds, the last also runs the head and the loss).
   Then, per round: each device alone on its data-parallel share (the ideal is the sum of their
   throughputs), data parallel with that split, the pipeline (balance = sum of stage compute times /
   (stages x the largest)) and, with `--rebalance` (default), data parallel from the nominal 2:1
   split with the runtime's `--rebalance`, which measures the replicas and moves micro-batches
   itself. The two alone jobs run at the same time (`--no-together`: one by one), since each rank
   of a plan shares the host with the other. Rounds are interleaved and the median of each
   measurement is used, so a change in machine load between runs hits all of them alike.

    python tools/bench_hetero.py [--mb 16 --reps 9 --iters 6 --rounds 2 --gbs 32]

Figures are noisy when other jobs share the CPUs; ratios are the meaningful part.
"""
import argparse
from concurrent.futures import ThreadPoolExecutor
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from megahet.config import build_config
from megahet.parallel.context import RankSpec, build_parallel_context
from megahet.parallel.links import Recv, Send
from megahet.testing import run_distributed
from megahet.training.pretrain import pretrain

NUM_LAYERS = 12
MODEL = dict(num_layers=NUM_LAYERS, hidden_size=256, num_attention_heads=4, seq_length=128, mock_data=True, vocab_size=512,
             make_vocab_size_divisible_by=8, lr=1e-3, min_lr=1e-4, lr_warmup_iters=1, log_interval=1,
             eval_interval=0, seed=3, distributed_timeout_s=120,
             overlap_grad_reduce=True)  # data parallel: bucket reductions run while backward continues


def _p2p(mb: int, reps: int):
    ctx = build_parallel_context(rank_specs=[RankSpec("cpu"), RankSpec("sim", {"speed": 1.0})], timeout_s=120)
    n = mb * 2**20 // 4
    x = torch.randn(n)  # [n] fp32
    plain = dist.new_group([0, 1], backend="gloo")
    bridged_s, gloo_s = [], []
    def bridged():
        if ctx.rank == 0:
            ctx.links.exchange([Send(x, 1)], [])
        else:
            ctx.links.exchange([], [Recv((n,), torch.float32, 0)])

    def gloo():
        if ctx.rank == 0:
            dist.send(x, 1, group=plain)
        else:
            dist.recv(torch.empty(n), 0, group=plain)  # [n]: a new receive buffer, like the bridge's

    for i in range(reps + 1):  # the first round warms both paths up; the order alternates
        for fn, times in ((bridged, bridged_s), (gloo, gloo_s))[::1 if i % 2 else -1]:
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"bridged_s": statistics.median(bridged_s[1:]), "gloo_s": statistics.median(gloo_s[1:]),
            "bytes": n * 4, "bridge_bytes": ctx.counters.bridge_bytes}


def _reduce(mb: int, reps: int):
    specs = [RankSpec("cpu"), RankSpec("cpu"), RankSpec("sim", {"speed": 1.0}), RankSpec("sim", {"speed": 1.0})]
    ctx = build_parallel_context(rank_specs=specs, timeout_s=120)
    n = mb * 2**20 // 4
    plain = dist.new_group([0, 1, 2, 3], backend="gloo")
    hier_s, gloo_s = [], []
    x = torch.randn(n)  # [n] fp32
    for i in range(reps + 1):  # the first round warms both paths up; the order alternates
        for fn, times in (((lambda: ctx.dp_group.all_reduce(x)), hier_s),
                          ((lambda: dist.all_reduce(x, group=plain)), gloo_s))[::1 if i % 2 else -1]:
            x.normal_()
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    bridge = ctx.counters.bridge_bytes / (reps + 1)
    ctx.dp_group.close()
    return {"hier_s": statistics.median(hier_s[1:]), "gloo_s": statistics.median(gloo_s[1:]), "bytes": n * 4,
            "bridge_bytes_per_call": bridge, "kind": type(ctx.dp_group).__name__}


def _train(over: dict):
    cfg = build_config(overrides={**MODEL, **over})
    pretrain(cfg)
    if cfg.logging.metrics_file and os.path.exists(cfg.logging.metrics_file):
        with open(cfg.logging.metrics_file) as fh:
            return [json.loads(line) for line in fh]
    return None


def _write(tmp, name, text):
    path = os.path.join(tmp, name)
    with open(path, "w") as fh:
        fh.write(text)
    return path


CLUSTER = "groups:\n  - {name: fast, backend: cpu, devices: 1}\n  - {name: slow, backend: sim, devices: 1, speed: 0.5}\n"
ALONE = {"cpu": "groups:\n  - {name: fast, backend: cpu, devices: 1}\n",
         "sim": "groups:\n  - {name: slow, backend: sim, devices: 1, speed: 0.5}\n"}


def _run_plan(tmp, name, world, cluster, plan, iters, gbs, rebalance=False):
    records = run_distributed(_train, world, {
        "metrics_file": os.path.join(tmp, f"{name}.jsonl"), "train_iters": iters, "global_batch_size": gbs,
        "rebalance": rebalance,
        "cluster": _write(tmp, f"{name}_cluster.yaml", cluster), "plan": _write(tmp, f"{name}_plan.yaml", plan)},
        timeout=600, env={"MEGAHET_TEST_THREADS": "1"})[0]
    steady = records[1:]  # the first step pays for start-up
    tokens = statistics.median(r["tokens_per_s"] for r in steady)
    return tokens, steady


def _one_stage(group: str, micro_batches: int, mbs: int = 1) -> str:
    return (f"layers: [{NUM_LAYERS}]\npipelines:\n"
            f"  - {{micro_batch_size: {mbs}, micro_batches: {micro_batches}, stages: [{{group: {group}}}]}}\n")


def _alone_pair(tmp, tag, cpu_samples, sim_samples, iters, together):
    """Tokens/s of the cpu alone on `cpu_samples` per step and the sim alone on `sim_samples`."""
    jobs = {"cpu": (1, ALONE["cpu"], _one_stage("fast", cpu_samples), iters, cpu_samples),
            "sim": (1, ALONE["sim"], _one_stage("slow", sim_samples), iters, sim_samples)}
    if not together:
        return {k: _run_plan(tmp, f"{tag}_{k}", *job)[0] for k, job in jobs.items()}
    with ThreadPoolExecutor(2) as pool:  # both at once: each shares the host as the plan's two ranks do
        futures = {k: pool.submit(_run_plan, tmp, f"{tag}_{k}", *job) for k, job in jobs.items()}
        return {k: f.result()[0] for k, f in futures.items()}


def balanced_split(total: int, ratio: float) -> tuple:
    """Whole units (samples or layers) for the cpu and the sim device, at least one each, that minimise
    the slower device's time given their measured per-unit speeds (`ratio` = sim / cpu): what
    balancing a plan by hand means."""
    sim = min(range(1, total), key=lambda k: max(total - k, k / ratio))
    return total - sim, sim


def _pp_plan(layers) -> str:
    return (f"layers: [{layers[0]}, {layers[1]}]\npipelines:\n"
            "  - {micro_batch_size: 2, micro_batches: 8, stages: [{group: fast}, {group: slow}]}\n")


def _balance(record) -> float:
    """Sum of stage compute times / (stages x the largest), for one step's metrics record."""
    compute = [s["compute_s"] for s in record["stages"].values()]
    return sum(compute) / (len(compute) * max(compute))


def _balanced_layers(tmp, ratio: float, iters: int) -> tuple:
    """The pipeline's layer split, balanced by hand: the proportional share rounded down and up (the
    first stage also embeds, the last also computes the head and loss), each tried, and the better
    balanced one kept. The data-parallel speed ratio does not carry over exactly: in a pipeline both
    ranks also wait for each other, which changes how much their compute overlaps."""
    share = NUM_LAYERS / (1 + ratio)  # cpu layers in proportion to the measured speeds
    candidates = sorted({min(NUM_LAYERS - 1, max(1, int(share))), min(NUM_LAYERS - 1, max(1, int(share) + 1))})
    if len(candidates) == 1:
        return candidates[0], NUM_LAYERS - candidates[0]
    tried = {}
    for cpu_layers in candidates:
        layers = (cpu_layers, NUM_LAYERS - cpu_layers)
        _, steady = _run_plan(tmp, f"try{cpu_layers}", 2, CLUSTER, _pp_plan(layers), iters, 16)
        tried[layers] = statistics.median(_balance(rec) for rec in steady)
    return max(tried, key=tried.get)


def _plans(iters: int, rounds: int, together: bool, gbs: int, rebalance: bool):
    """Calibrate, then `rounds` interleaved rounds of: both devices alone on the balanced work, data
    parallel with the balanced split, the pipeline with balanced layers."""
    tokens = {"alone_cpu": [], "alone_sim": [], "dp": [], "pp": [], **({"dp_rebalance": []} if rebalance else {})}
    balances = []
    with tempfile.TemporaryDirectory() as tmp:
        # Calibration: each device alone on the nominal 2:1 work; their per-sample speeds set the split.
        # Twice: jobs of unequal length let the longer one finish alone, faster, so the second pass
        # measures again on the first pass's split, where both jobs last about as long.
        nominal = (gbs * 2 // 3, gbs - gbs * 2 // 3)
        cpu_n, sim_n = nominal
        for p in range(2):
            cal = _alone_pair(tmp, f"cal{p}", cpu_n, sim_n, iters, together)
            ratio = cal["sim"] / cal["cpu"]  # tokens/s are per-device throughputs: their ratio is the speed ratio
            cpu_n, sim_n = balanced_split(gbs, ratio)
        layers = _balanced_layers(tmp, ratio, iters)
        dp_plan = (f"layers: [{NUM_LAYERS}]\npipelines:\n"
                   f"  - {{micro_batch_size: 1, micro_batches: {cpu_n}, stages: [{{group: fast}}]}}\n"
                   f"  - {{micro_batch_size: 1, micro_batches: {sim_n}, stages: [{{group: slow}}]}}\n")
        nominal_plan = (f"layers: [{NUM_LAYERS}]\npipelines:\n"
                        f"  - {{micro_batch_size: 1, micro_batches: {nominal[0]}, stages: [{{group: fast}}]}}\n"
                        f"  - {{micro_batch_size: 1, micro_batches: {nominal[1]}, stages: [{{group: slow}}]}}\n")
        pp_plan = _pp_plan(layers)
        for r in range(rounds):
            alone = _alone_pair(tmp, f"alone{r}", cpu_n, sim_n, iters, together)
            tokens["alone_cpu"].append(alone["cpu"])
            tokens["alone_sim"].append(alone["sim"])
            tokens["dp"].append(_run_plan(tmp, f"dp{r}", 2, CLUSTER, dp_plan, iters, gbs)[0])
            if rebalance:  # the nominal 2:1 split, left to the runtime's --rebalance to correct
                tokens["dp_rebalance"].append(_run_plan(tmp, f"dpr{r}", 2, CLUSTER, nominal_plan, iters, gbs,
                                                        rebalance=True)[0])
            t, steady = _run_plan(tmp, f"pp{r}", 2, CLUSTER, pp_plan, iters, 16)
            tokens["pp"].append(t)
            balances += [_balance(rec) for rec in steady]
    med = {name: statistics.median(v) for name, v in tokens.items()}
    return {"alone": {"cpu": med["alone_cpu"], "sim": med["alone_sim"]}, "dp_tokens": med["dp"],
            "dp_rebalance_tokens": med.get("dp_rebalance"), "nominal": nominal,
            "pp_tokens": med["pp"], "balance": statistics.median(balances), "all": tokens,
            "ratio": ratio, "calibration": cal, "split": (cpu_n, sim_n), "layers": layers}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=16, help="MiB per transfer / reduction")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--iters", type=int, default=6, help="training steps per plan run")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the alone and plan runs")
    ap.add_argument("--rebalance", action=argparse.BooleanOptionalAction, default=True,
                    help="also run data parallel from the nominal 2:1 split with --rebalance")
    ap.add_argument("--gbs", type=int, default=32, help="samples per data-parallel step (micro-batches of 1)")
    ap.add_argument("--together", action=argparse.BooleanOptionalAction, default=True,
                    help="run the cpu-alone and sim-alone jobs at the same time (default), so each shares "
                         "this host's cores as the plan's two ranks do; --no-together runs them one by one")
    ap.add_argument("--parts", default="comm,plans", help="comm (P2P and reduction), plans, or both")
    args = ap.parse_args()
    env = {"MEGAHET_TEST_THREADS": "1"}
    if "comm" in args.parts.split(","):
        _comm(args, env)
    if "plans" in args.parts.split(","):
        _report_plans(args)


def _comm(args, env):
    p2p = run_distributed(_p2p, 2, args.mb, args.reps, timeout=600, env=env)[0]
    red = run_distributed(_reduce, 4, args.mb, args.reps, timeout=600, env=env)[0]
    gbps = lambda b, s: b / s / 1e9  # noqa: E731
    print(f"bridged P2P cpu->sim, {args.mb} MiB: {gbps(p2p['bytes'], p2p['bridged_s']):.2f} GB/s vs plain gloo "
          f"{gbps(p2p['bytes'], p2p['gloo_s']):.2f} GB/s -> {p2p['gloo_s'] / p2p['bridged_s']:.0%} of gloo")
    print(f"hierarchical all-reduce cpu,cpu,sim,sim, {args.mb} MiB: {gbps(red['bytes'], red['hier_s']):.2f} GB/s vs "
          f"plain gloo all-reduce {gbps(red['bytes'], red['gloo_s']):.2f} GB/s -> "
          f"{red['gloo_s'] / red['hier_s']:.0%} of gloo; bridged {red['bridge_bytes_per_call'] / 2**20:.1f} MiB "
          f"per call on rank 0 (the tensor is {args.mb} MiB)")


def _report_plans(args):
    plans = _plans(args.iters, args.rounds, args.together, args.gbs, args.rebalance)
    cal, (cpu_n, sim_n), layers = plans["calibration"], plans["split"], plans["layers"]
    print(f"calibration (each device alone, second pass): cpu {cal['cpu']:.0f} tokens/s, sim(0.5) "
          f"{cal['sim']:.0f} tokens/s -> sim runs at {plans['ratio']:.3f} of the cpu; hand-balanced split "
          f"{cpu_n} + {sim_n} samples, layers {layers[0]} + {layers[1]}")
    ideal = plans["alone"]["cpu"] + plans["alone"]["sim"]
    print(f"alone: cpu {plans['alone']['cpu']:.0f} tokens/s ({cpu_n} samples), sim(0.5) {plans['alone']['sim']:.0f} "
          f"tokens/s ({sim_n} samples), ideal sum {ideal:.0f}")
    print(f"data parallel {cpu_n}+{sim_n} samples: {plans['dp_tokens']:.0f} tokens/s -> "
          f"{plans['dp_tokens'] / ideal:.0%} of ideal")
    if plans["dp_rebalance_tokens"] is not None:
        n = plans["nominal"]
        print(f"data parallel from the nominal {n[0]}+{n[1]} split with --rebalance: {plans['dp_rebalance_tokens']:.0f} "
              f"tokens/s -> {plans['dp_rebalance_tokens'] / ideal:.0%} of ideal")
    print(f"pipeline layers {layers[0]}+{layers[1]}: {plans['pp_tokens']:.0f} tokens/s, stage balance "
          f"{plans['balance']:.0%}")
    print("tokens/s per round: " + ", ".join(f"{k} {[round(v) for v in vs]}" for k, vs in plans["all"].items()))


if __name__ == "__main__":
    main()
