"""Plan a training job on a cluster: the chosen plan, predicted step time, throughput, memory and MFU.

    python tools/plan.py --cluster examples/configs/cluster_cpu_sim.yaml --config examples/configs/gpt_small.yaml
    python tools/plan.py --cluster examples/configs/cluster_50k_mixed.yaml --config examples/configs/moe_1t.yaml \
        --json --output plan.yaml --figure plan.png

Model and batch flags are the pretraining flags. Layout flags given on the command line
(--tensor-model-parallel-size, --pipeline-model-parallel-size, --expert-model-parallel-size,
--data-parallel-size, --micro-batch-size, --pipeline-layers, --num-layers-per-virtual-pipeline-stage,
--recompute-granularity) fix that part of the layout; with all of them the tool evaluates that layout.
`--output plan.yaml` writes a file `--plan` accepts.
"""
import argparse
import logging
import os
import sys

import yaml

from megahet.config import build_arg_parser, build_config
from megahet.errors import MegahetError

_LAYOUT_FLAGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                 "micro_batch_size", "pipeline_layers", "num_layers_per_virtual_pipeline_stage",
                 "recompute_granularity")


def _parser() -> argparse.ArgumentParser:
    ap = build_arg_parser()
    ap.description = __doc__.splitlines()[0]
    g = ap.add_argument_group("plan")
    g.add_argument("--data-parallel-size", type=int, default=None, help="Fix the number of pipelines (replicas).")
    g.add_argument("--json", action="store_true", help="Print one JSON object (step_time_s, tokens_per_s, ...).")
    g.add_argument("--output", default=None, help="Write the plan as YAML for --plan.")
    g.add_argument("--figure", default=None, help="Draw groups x stages and the simulated timeline (PNG).")
    g.add_argument("--no-profile", action="store_true",
                   help="Cost cpu/sim groups from FLOPs too (needs tflops); measure no links or process memory.")
    g.add_argument("--layout", choices=["mixed", "split"], default=None,
                   help="Only mixed pipelines (stages on several groups) or only split ones (one group each).")
    g.add_argument("--allow-idle", action="store_true",
                   help="Allow plans that leave devices idle (such a plan runs only on a trimmed cluster spec).")
    g.add_argument("--confirm", type=int, default=0, metavar="N",
                   help="Run the top N candidates for a few steps on this machine and keep the fastest measured.")
    return ap


_TOOL_ONLY = {"--json": 0, "--output": 1, "--figure": 1, "--no-profile": 0, "--layout": 1, "--confirm": 1,
              "--allow-idle": 0, "--data-parallel-size": 1, "--cluster": 1, "--plan": 1}


def _training_flags(argv):
    """The command line minus the planning-only flags: what each --confirm training run gets."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in _TOOL_ONLY:
            skip = 0 if "=" in a else _TOOL_ONLY[name]
            continue
        out.append(a)
    return out


def _bar(done: int, total: int, label: str) -> None:
    width = 30
    fill = int(width * done / max(total, 1))
    sys.stderr.write(f"\rprofiling [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {label[:40]:<40}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = _parser().parse_args(argv)
    try:
        from megahet.hetero.autoplan import plan_job
        from megahet.hetero.cluster import load_cluster
        from megahet.hetero.plan_report import dumps, to_json, to_text, write_figure
        if not args.cluster:
            raise MegahetError("tools/plan.py needs --cluster FILE (the device groups to plan for)")
        cfg = build_config(yaml_path=args.config, args=args, validate=False)
        cluster = load_cluster(args.cluster)
        given = {k: getattr(args, k) for k in _LAYOUT_FLAGS if getattr(args, k, None) is not None}
        if args.data_parallel_size:
            given["data_parallel_size"] = args.data_parallel_size
        if args.recompute_granularity is None and "--recompute-granularity" in (argv or sys.argv):
            given["recompute_granularity"] = None
        res = plan_job(cfg, cluster, given, measure=not args.no_profile,
                       progress=None if args.json else _bar, layout=args.layout, allow_idle=args.allow_idle)
        if args.confirm:
            from megahet.hetero.confirm import confirm
            res = confirm(res, cluster, args.cluster, _training_flags(argv if argv is not None else sys.argv[1:]),
                          args.confirm)
        if args.output:
            from megahet.hetero.plan_io import write_plan
            write_plan(res.plan, args.output)
        if args.figure:
            write_figure(res, args.figure)
        print(dumps(to_json(res)) if args.json else to_text(res))
    except MegahetError as exc:
        print(f"megahet error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
