"""Predicted vs measured step time of cpu+sim plans run for real on this machine.

For each case: profile the model here (fresh, not cached: the machine's speed drifts by +-15% from one
second to the next and more over minutes), predict the plan, train it with torchrun (mock data) and take
the median step time after two warm-up steps; --runs times, profiling before, between and after the
runs, and compare the median of the predictions with the median of the measurements (either side: one
profile or one run can catch a slow moment of this VM). Every rank of the
case's cluster is profiled at the same time, as the job runs them (a sim rank idling as the sim backend
does: co-running profiles, as auto-planning takes them), each item for --min-seconds, and a TP or EP layout's
shards with their peers. Cases and profiles run with glibc keeping freed memory (the runtime's
--host-allocator retain), so that a process's speed depends less on its allocation history (the same job measured 0.58-0.82 s in three runs without it, 0.61-0.66 s with it).
The gloo link figures (pipeline message and each collective) are measured once at the start.

    python tools/bench_planner_measured.py [--detail] [--only dp,pp] [--runs 3] [--min-seconds 1]

Plans are the uniform layouts the runtime runs from flags (Plan.uniform over the cluster spec), or
plan files when the runtime accepts --plan.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megahet.config import build_config  # noqa: E402
from megahet.hetero import cost_model as cm  # noqa: E402
from megahet.hetero.autoplan import add_shards, first_per_group, local_speeds, params_dtype  # noqa: E402
from megahet.hetero.cluster import parse_cluster  # noqa: E402
from megahet.hetero.plan import Plan, even_layers  # noqa: E402
from megahet.hetero.planner import cluster_groups  # noqa: E402
from megahet.hetero.predict import Options, predict  # noqa: E402
from megahet.hetero.process_memory import runtime_overhead  # noqa: E402
from megahet.hetero.profile import load_or_measure, load_or_measure_together, measure_links  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL = dict(hidden_size=256, num_attention_heads=4, seq_length=128, vocab_size=2048, global_batch_size=8,
             micro_batch_size=2, num_layers=8)
CPU_SIM = {"groups": [{"name": "fast", "backend": "cpu", "devices": 1},
                      {"name": "slow", "backend": "sim", "devices": 1, "speed": 0.5}]}
CPU2 = {"groups": [{"name": "cpu", "backend": "cpu", "devices": 2}]}
# Two speeds in one sim domain: TP2 x PP2 with stages in two sim domains hangs on the current runtime.
SIM4 = {"groups": [{"name": "a", "backend": "sim", "devices": 2, "speed": 0.5},
                   {"name": "b", "backend": "sim", "devices": 2, "speed": 0.25}]}
SIM4Q = {"groups": [{"name": "q", "backend": "sim", "devices": 4, "speed": 0.25}]}
# Two simulated data centres joined by a slow link: the runtime throttles every message between them
# (megahet/parallel/link_throttle.py) to latency + bytes / bandwidth.
TWO_SITES = {"groups": [{"name": "fast", "backend": "cpu", "devices": 1, "site": "dc1"},
                        {"name": "slow", "backend": "sim", "devices": 1, "speed": 0.5, "site": "dc2"}],
             "links": {"cross_site": 0.05, "cross_site_latency_ms": 20}}

# name -> (cluster, layout flags, model overrides)
CASES = {
    # TP 1 given explicitly: with no layout flag, --cluster would auto-plan instead of running this layout.
    "dp": (CPU_SIM, {"tensor_model_parallel_size": 1}, {}),
    "pp": (CPU_SIM, {"pipeline_model_parallel_size": 2}, {}),
    "pp-uneven": (CPU_SIM, {"pipeline_model_parallel_size": 2, "pipeline_layers": [6, 2]}, {}),
    "pp-interleaved": (CPU_SIM, {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 2},
                       {"global_batch_size": 16}),
    "tp": (CPU2, {"tensor_model_parallel_size": 2}, {}),
    "moe-ep": (CPU2, {"expert_model_parallel_size": 2},
               {"num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 256}),
    "dp-distopt-recompute": (CPU2, {"tensor_model_parallel_size": 1, "use_distributed_optimizer": True,
                                    "recompute_granularity": "full"}, {}),
    "pp4-sim": (SIM4Q, {"pipeline_model_parallel_size": 4}, {"global_batch_size": 16}),
    "tp2xpp2-mixed": (SIM4, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}, {}),
    "pp-2sites": (TWO_SITES, {"pipeline_model_parallel_size": 2, "pipeline_layers": [6, 2]}, {}),
    "dp-2sites": (TWO_SITES, {"tensor_model_parallel_size": 1}, {}),
}


def _flags(d: dict):
    out = []
    for k, v in d.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif isinstance(v, list):
            out += [flag, ",".join(map(str, v))]
        else:
            out += [flag, str(v)]
    return out


def predict_case(cluster_raw, layout, model, profile, links_prof):
    cfg = build_config(overrides={**MODEL, **model, **layout, "mock_data": True, "train_iters": 10}, validate=False)
    cluster = parse_cluster(cluster_raw)
    world = cluster.world_size
    tp = layout.get("tensor_model_parallel_size", 1)
    pp = layout.get("pipeline_model_parallel_size", 1)
    dp = world // (tp * pp)
    layers = layout.get("pipeline_layers") or even_layers(cfg.model.num_layers, pp)
    v = 1
    if layout.get("num_layers_per_virtual_pipeline_stage"):
        v = cfg.model.num_layers // pp // layout["num_layers_per_virtual_pipeline_stage"]
    mbs = cfg.train.micro_batch_size
    m = cfg.train.global_batch_size // (mbs * dp)
    plan = Plan.uniform(tp, pp, dp, layers, mbs, m, virtual_stages=v,
                        expert_parallel=layout.get("expert_model_parallel_size", 1), cluster=cluster).to_dict()
    for p in plan["pipelines"]:
        for s in p["stages"]:
            s.pop("ranks", None)
    spec = cm.ModelSpec.from_config(cfg)
    groups = cluster_groups(cluster, profile)
    # Measured here unless the spec sets the link (simulated sites).
    links = cm.Links.from_cluster(cluster.links).apply_measured(links_prof, cluster.links)
    opts = Options(recompute=cfg.train.recompute_granularity,
                   distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    return predict(plan, spec, groups, links, opts, keep_timeline=True), cfg


def case_profile(cfg, cluster_raw, min_seconds=1.0, tp=1, ep=1):
    """What cluster_groups takes for the case, fresh (the host's speed drifts): {group: its own profile},
    every rank of the cluster measured at the same time as the job runs them (a sim rank idling as the sim
    backend does), each item timed for at least `min_seconds`; one CPU profile for a one-rank cluster.
    With tp or ep > 1, each group's TP / EP shards are also timed with their peers
    (profile.load_or_measure_shards_together)."""
    ranks = local_speeds(parse_cluster(cluster_raw))
    kw = dict(threads=1, micro_batch_sizes=(cfg.train.micro_batch_size,), vocab_size=cfg.model.vocab_size,
              use_cache=False, min_seconds=min_seconds)
    if len(ranks) == 1:
        return load_or_measure(cfg.model, params_dtype(cfg), repeats=5, **kw)
    out = first_per_group(ranks, load_or_measure_together(cfg.model, params_dtype(cfg), [s for _, s in ranks], **kw))
    if tp > 1 or ep > 1:
        add_shards(cfg, ranks, out, tp, ep, **kw)
    return out


def run_case(cluster_raw, layout, model, iters, port, detail=False):
    """Median step time after two warm-up steps; with detail, also the median compute seconds of each
    pipeline stage (the slowest rank's forward/backward, sim stretching included) from the metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        cpath = os.path.join(tmp, "cluster.yaml")
        import yaml
        with open(cpath, "w") as fh:
            yaml.safe_dump(cluster_raw, fh)
        metrics = os.path.join(tmp, "m.jsonl")
        world = sum(g["devices"] for g in cluster_raw["groups"])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
               str(port), os.path.join(ROOT, "examples", "pretrain_gpt.py"), "--cluster", cpath, "--mock-data",
               "--train-iters", str(iters), "--log-interval", "1", "--eval-interval", "100000",
               "--metrics-file", metrics] + _flags({**MODEL, **model, **layout})
        env = dict(os.environ, OMP_NUM_THREADS="1")  # as profiled: one thread per rank on this shared host
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            fd, log = tempfile.mkstemp(prefix="megahet-bench-failed-", suffix=".log")
            with os.fdopen(fd, "w") as fh:
                fh.write(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
            raise RuntimeError(f"{proc.stderr[-2000:]}\n(the whole output: {log})")
        with open(metrics) as fh:
            rows = [json.loads(line) for line in fh]
    rows = rows[2:] if len(rows) > 3 else rows[-1:]
    step = statistics.median(r["step_time_s"] for r in rows)
    if not detail:
        return step
    compute = [statistics.median(r["stages"][k]["compute_s"] for r in rows) for k in sorted(rows[0]["stages"])]
    return step, compute


def _layer_ms(profiles, mbs: int) -> str:
    """One profile's first layer kind, forward + backward milliseconds per group ("21/44"): which profile
    caught a slow moment."""
    profs = profiles if isinstance(profiles, dict) else {"": profiles}
    kind = "dense" if "dense/%d" % mbs in next(iter(profs.values())).times else "moe"
    return "/".join(f"{sum(p.times[f'{kind}/{mbs}']) * 1e3:.0f}" for p in profs.values())


def _load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def _speed_ratio(profiles) -> str:
    """The sim group's measured throughput relative to the cpu group's (dense layer, largest size)."""
    if not isinstance(profiles, dict):
        return "n/a (one shared CPU profile)"
    key = max(profiles["fast"].times, key=lambda k: (k.split("/")[0] == "dense", int(k.split("/")[1])))
    return f"{sum(profiles['fast'].times[key]) / sum(profiles['slow'].times[key]):.3f} ({key})"


def autoplan_pipeline(iters: int, rounds: int = 2, detail: bool = False, neighbours: bool = False):
    """Auto-planned 2-stage pipeline of a 12-layer model on cpu(1)+sim(0.5) against its ideal (0.75 x the
    homogeneous pipeline, cpu + sim at speed 1, measured in the same run) and the uniform 6+6 split.

    The split is what `--cluster` planning chooses with the stage count fixed at 2 (autoplan.search_uniform
    on the groups' co-running profiles); the runs pass it as --pipeline-layers. detail: each run's
    per-stage compute seconds per step (sim idling included) next to its step time. neighbours: also
    the splits one layer either side of the planner's, to see whether a better one existed."""
    os.environ["OMP_NUM_THREADS"] = "1"  # what run_case gives each rank: the same profile
    from megahet.hetero.autoplan import measure_profiles, search_uniform
    from megahet.hetero.planner import Settings
    model = {**MODEL, "num_layers": 12, "global_batch_size": 16}
    hetero = {"groups": [{"name": "fast", "backend": "cpu", "devices": 1},
                         {"name": "slow", "backend": "sim", "devices": 1, "speed": 0.5}]}
    homo = {"groups": [{"name": "fast", "backend": "cpu", "devices": 1},
                       {"name": "same", "backend": "sim", "devices": 1, "speed": 1.0}]}
    cfg = build_config(overrides={**model, "mock_data": True, "train_iters": 10}, validate=False)
    cluster = parse_cluster(hetero)
    profiles = measure_profiles(cfg, cluster)
    spec = cm.ModelSpec.from_config(cfg)
    plan, pred, _ = search_uniform(spec, cluster_groups(cluster, profiles), cm.Links(), cluster, 16,
                                   {"pipeline_model_parallel_size": 2, "micro_batch_size": 2,
                                    "recompute_granularity": None}, Settings(max_virtual_stages=1))
    layers = plan["layers"]
    print(f"load average at start {_load()}; sim / cpu throughput measured co-running: {_speed_ratio(profiles)}",
          flush=True)
    runs = {"homogeneous 6+6 (cpu + sim 1.0)": (homo, [6, 6]), f"auto {layers[0]}+{layers[1]} (cpu + sim 0.5)":
            (hetero, layers), "uniform 6+6 (cpu + sim 0.5)": (hetero, [6, 6])}
    if neighbours:
        for a in (layers[0] - 1, layers[0] + 1):
            if 0 < a < 12 and a != 6:
                runs[f"other {a}+{12 - a} (cpu + sim 0.5)"] = (hetero, [a, 12 - a])
    tokens = {k: [] for k in runs}
    for r in range(rounds):
        for i, (name, (cl, split)) in enumerate(runs.items()):
            out = run_case(cl, {"pipeline_model_parallel_size": 2, "pipeline_layers": split, "micro_batch_size": 2},
                           {**model}, iters, 29750 + 10 * r + i, detail=detail)
            step = out[0] if detail else out
            tokens[name].append(16 * model["seq_length"] / step)
            if detail:
                print(f"    {name:<34} step {step:.3f} s, stage compute "
                      + " / ".join(f"{c:.3f}" for c in out[1]) + " s", flush=True)
        names = list(runs)
        print(f"  round {r + 1} (load {_load()}): " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in tokens.items())
              + f" tokens/s; auto / ideal {tokens[names[1]][-1] / (0.75 * tokens[names[0]][-1]):.3f}", flush=True)
    med = {k: statistics.median(v) for k, v in tokens.items()}
    names = list(runs)
    ideal = 0.75 * med[names[0]]
    print(f"\n2-stage pipeline, 12 layers, cpu(1)+sim(0.5): planner's split {layers} "
          f"(predicted {pred.tokens_per_s:.0f} tokens/s); medians of {rounds} alternating runs; load {_load()}")
    for k in names:
        print(f"  {k:<34} {med[k]:>8.0f} tokens/s")
    print(f"  auto / ideal (0.75 x homogeneous) = {med[names[1]] / ideal:.3f} (target >= 0.975); "
          f"speedup over the uniform split {med[names[1]] / med[names[2]]:.2f}x")


def autoplan_dp(iters: int, rounds: int = 2, gbs: int = 48, together: bool = False):
    """`--cluster` with no layout flags on cpu(1)+sim(0.5), 8 layers: the planner's data-parallel plan
    against the sum of each device training the same job alone (cpu alone, sim(0.5) alone), all three
    measured in the same run, alternating, `rounds` times. Every job runs with --overlap-grad-reduce
    (only the combined one has gradients to exchange).

    together: run the two alone jobs at the same time (the sim one half the steps, so both last about
    as long), so each device's job shares this host with the other as the two ranks of the combined
    job do; on a host with fewer free cores than ranks, one job alone gets more CPU than either rank of
    the combined job, which would bias the comparison against the combined job."""
    os.environ["OMP_NUM_THREADS"] = "1"  # what run_case gives each rank: the same profile, the same plan
    from megahet.hetero.autoplan import choose_plan, measure_profiles
    model = {"global_batch_size": gbs, "overlap_grad_reduce": True}
    both = CPU_SIM
    cpu = {"groups": [CPU_SIM["groups"][0]]}
    sim = {"groups": [CPU_SIM["groups"][1]]}
    cfg = build_config(overrides={**MODEL, **model, "mock_data": True, "train_iters": 10}, validate=False)
    plan = choose_plan(cfg, parse_cluster(both))  # profiles (co-running) and plans as the job will, then cached
    print(f"load average at start {_load()}; sim / cpu throughput measured co-running: "
          f"{_speed_ratio(measure_profiles(cfg, parse_cluster(both)))}; plan predicted "
          f"{plan.predicted.get('step_time_s')} s/step", flush=True)
    runs = {"cpu alone": cpu, "sim(0.5) alone": sim, "auto-planned cpu + sim(0.5)": both}
    tokens = {k: [] for k in runs}
    for r in range(rounds):
        if together:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(2) as pool:
                jobs = [pool.submit(run_case, runs[name], {}, model, n, 29800 + 10 * r + i)
                        for i, (name, n) in enumerate((("cpu alone", 2 * iters), ("sim(0.5) alone", iters)))]
                steps = [j.result() for j in jobs]
            for name, step in zip(("cpu alone", "sim(0.5) alone"), steps):
                tokens[name].append(gbs * MODEL["seq_length"] / step)
            step = run_case(both, {}, model, iters, 29800 + 10 * r + 2)
            tokens["auto-planned cpu + sim(0.5)"].append(gbs * MODEL["seq_length"] / step)
            names = list(runs)
            print(f"  round {r + 1} (load {_load()}): " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in tokens.items())
                  + f" tokens/s; auto / sum {tokens[names[2]][-1] / (tokens[names[0]][-1] + tokens[names[1]][-1]):.3f}",
                  flush=True)
            continue
        for i, (name, cl) in enumerate(runs.items()):
            step = run_case(cl, {}, model, iters, 29800 + 10 * r + i)
            tokens[name].append(gbs * MODEL["seq_length"] / step)
            print(f"  round {r + 1} {name:<28} {tokens[name][-1]:>8.0f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in tokens.items()}
    names = list(runs)
    shape = " + ".join(f"{p.micro_batches} x {p.micro_batch_size} on {p.stages[0].group}" for p in plan.pipelines)
    how = "the two alone jobs run at the same time" if together else "one job at a time"
    print(f"\ndata parallel, 8 layers, batch {gbs}, cpu(1)+sim(0.5): planner's plan {shape} "
          f"(layers {plan.layers}); medians of {rounds} alternating rounds, {how}; load {_load()}")
    for k in names:
        print(f"  {k:<30} {med[k]:>8.0f} tokens/s")
    print(f"  auto / (cpu alone + sim alone) = {med[names[2]] / (med[names[0]] + med[names[1]]):.3f} "
          f"(target >= 0.975)")


def _peak_child(overrides):
    """Train in this (fresh) process; the rise of anonymous resident memory over the run, in bytes."""
    from megahet.memory_probe import PeakSampler, exact_malloc_accounting
    exact_malloc_accounting()  # large blocks get their own mapping and are returned at free
    from megahet.training.pretrain import pretrain
    cfg = build_config(overrides=overrides)
    with PeakSampler() as sampler:
        pretrain(cfg)
    return sampler.extra


MEMORY_CASES = {
    "no recompute, mbs 2": {},
    "4 layers, mbs 2": {"num_layers": 4},
    "16 layers, mbs 2": {"num_layers": 16},
    "no recompute, mbs 4": {"micro_batch_size": 4},
    "full recompute, mbs 4": {"micro_batch_size": 4, "recompute_granularity": "full"},
}


def memory_table():
    """Predicted per-rank memory (parameters, fp32 gradients, Adam state, activations, and what the
    process holds outside the model, measured by a one-layer probe job: process_memory) against the peak
    anonymous resident memory a one-process cpu run adds while it builds the model and trains 3 steps
    (RssAnon with exact malloc accounting: tensors and everything else the run allocates)."""
    import multiprocessing as mp
    os.environ.update(OMP_NUM_THREADS="1", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    print(f"{'case':<24} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'reserved':>8} {'predicted':>10} "
          f"{'measured':>9} "
          f"{'error':>7}   (MB)")
    for name, extra in MEMORY_CASES.items():
        overrides = {**MODEL, **extra, "mock_data": True, "train_iters": 3, "log_interval": 1,
                     "eval_interval": 100000}
        cfg = build_config(overrides=overrides, validate=False)
        prof = load_or_measure(cfg.model, params_dtype(cfg), threads=1, micro_batch_sizes=(cfg.train.micro_batch_size,),
                               vocab_size=cfg.model.vocab_size)
        prof.reserved_bytes = runtime_overhead(cfg)  # the one-layer probe, cached per model shape
        layout = {k: v for k, v in extra.items() if k == "recompute_granularity"}
        pred, _ = predict_case({"groups": [CPU_SIM["groups"][0]]}, layout, extra, prof, {})
        mem = pred.stages[0].memory
        with mp.get_context("spawn").Pool(1) as pool:
            measured = pool.apply(_peak_child, (overrides,))
        mb = 1e6
        print(f"{name:<24} {mem.params / mb:>8.1f} {mem.grads / mb:>8.1f} {mem.optimizer / mb:>8.1f} "
              f"{mem.activations / mb:>8.1f} {mem.reserved / mb:>8.1f} {mem.total / mb:>10.1f} {measured / mb:>9.1f} "
              f"{(mem.total / measured - 1) * 100:>+6.1f}%", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", default=None, help="comma-separated case names")
    ap.add_argument("--autoplan", action="store_true", help="only the auto-plan quality measurement (pipeline)")
    ap.add_argument("--detail", action="store_true", help="also per-stage compute, predicted and measured")
    ap.add_argument("--memory", action="store_true", help="only predicted vs measured peak memory")
    ap.add_argument("--neighbours", action="store_true", help="--autoplan: also the splits one layer either side")
    ap.add_argument("--together", action="store_true", help="--autoplan-dp: run the two alone jobs at once")
    ap.add_argument("--autoplan-dp", action="store_true", help="only the auto-plan quality measurement (data "
                    "parallel vs each device alone)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the auto-plan measurement")
    ap.add_argument("--runs", type=int, default=3, help="runs of each case (profiled before, between, after)")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="seconds each profiled item is timed for")
    ap.add_argument("--allocator", choices=("retain", "default"), default="retain",
                    help="glibc allocator settings of the cases and profiles (--host-allocator)")
    args = ap.parse_args()
    if args.autoplan:
        autoplan_pipeline(args.iters, args.rounds, args.detail, args.neighbours)
        return
    if args.memory:
        memory_table()
        return
    if args.autoplan_dp:
        autoplan_dp(args.iters, args.rounds, together=args.together)
        return
    names = args.only.split(",") if args.only else list(CASES)
    if args.allocator == "retain":
        retain_freed_memory()
    links_prof = measure_links()
    print("gloo here (after compute, mean): " + "; ".join(
        f"{k.split('/')[-1] if '/' in k else 'pipeline message'} {bw / 1e9:.2f} GB/s {lat * 1e6:.0f} us"
        for k, (bw, lat) in links_prof.items() if k.startswith("intra_node")))
    print(f"{args.runs} runs of {args.iters} steps per case, co-running profiles before, "
          f"between and after; allocator {args.allocator}; load average {_load()}")
    print(f"{'case':<22} {'predicted s':>11} {'measured s':>11} {'error':>7}   plan")
    errors = []
    for i, name in enumerate(names):
        cluster_raw, layout, model = CASES[name]
        cfg = build_config(overrides={**MODEL, **model, "mock_data": True, "train_iters": 10}, validate=False)
        preds, layer_ms = [], []

        def profile_all():
            prof = case_profile(cfg, cluster_raw, args.min_seconds, layout.get("tensor_model_parallel_size", 1),
                                layout.get("expert_model_parallel_size", 1))
            preds.append(predict_case(cluster_raw, layout, model, prof, links_prof)[0])
            layer_ms.append(_layer_ms(prof, cfg.train.micro_batch_size))

        # The host's speed drifts by +-15% from second to second and more over minutes: profile before,
        # between and after the runs, and average each side.
        steps, computes = [], []
        profile_all()
        for r in range(args.runs):
            try:
                step, compute = run_case(cluster_raw, layout, model, args.iters, 29700 + 10 * i + r, detail=True)
            except RuntimeError as exc:  # once, and said: the table then shows a run that completed
                print(f"  {name} run {r + 1} failed, run again: {str(exc).splitlines()[-1]}", flush=True)
                step, compute = run_case(cluster_raw, layout, model, args.iters, 29800 + 10 * i + r, detail=True)
            steps.append(step)
            computes.append(compute)
            profile_all()
        measured = statistics.median(steps)  # a run can catch a slow moment too
        predicted = statistics.median(p.step_time_s for p in preds)  # one profile can catch a slow moment
        err = predicted / measured - 1
        errors.append(abs(err))
        desc = ", ".join(f"{k}={v}" for k, v in layout.items()) or "dp"
        print(f"{name:<22} {predicted:>11.3f} {measured:>11.3f} {err * 100:>+6.1f}%   {desc}", flush=True)
        if args.detail:
            ps = preds
            busy = [statistics.mean(p.slowest.busy[k] for p in ps) for k in range(len(ps[0].slowest.busy))]
            print(f"{'':<22} runs {', '.join(f'{x:.3f}' for x in steps)} s, compute per stage "
                  + ", ".join(f"{statistics.mean(c[k] for c in computes):.3f}" for k in range(len(computes[0])))
                  + f"; predicted compute per stage {', '.join(f'{x:.3f}' for x in busy)}, pipeline "
                  f"{statistics.mean(p.pipeline_time_s for p in ps):.3f} + dp "
                  f"{statistics.mean(p.dp_exposed_s for p in ps):.3f} + optimizer "
                  f"{statistics.mean(p.optimizer_s for p in ps):.3f} s; single profiles "
                  + ", ".join(f"{p.step_time_s:.3f}" for p in ps) + "; their layer forward + backward ms "
                  + ", ".join(layer_ms), flush=True)
    print(f"mean |error| {statistics.mean(errors) * 100:.1f}%, max {max(errors) * 100:.1f}%, "
          f"within 10%: {sum(e <= 0.10 for e in errors)} of {len(errors)}")


def retain_freed_memory():
    """Cases and profiles with glibc keeping freed memory (--host-allocator retain, by its environment
    variables so every child process inherits it): without it each step page-faults its activations
    back, and a process's step time depends on its allocation history (the same job measured 0.58-0.82
    s in three runs, 0.61-0.66 s with it)."""
    from megahet.host_allocator import configure_host_allocator
    os.environ.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="2147483647")
    configure_host_allocator("retain")


if __name__ == "__main__":
    main()
