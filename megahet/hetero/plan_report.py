"""Present a planner result: the text table, the stable JSON object and the figure."""
from __future__ import annotations

import json
from typing import Dict, List, Tuple

from megahet.errors import MegahetError
from megahet.hetero.planner import Result


def pipeline_summary(plan: dict) -> List[Tuple[int, int, int, str]]:
    """(count, micro-batch size, micro-batches, stage groups) of each distinct pipeline, in plan order."""
    out: Dict[tuple, int] = {}
    for p in plan["pipelines"]:
        key = (p["micro_batch_size"], p["micro_batches"],
               " | ".join(f"{s['group']}/tp{s['tensor_parallel']}" for s in p["stages"]))
        out[key] = out.get(key, 0) + 1
    return [(n, k[0], k[1], k[2]) for k, n in out.items()]


def _compress(stages: str) -> str:
    parts = stages.split(" | ")
    runs: List[List] = []
    for s in parts:
        if runs and runs[-1][0] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    return ", ".join(f"{s} x{n}" if n > 1 else s for s, n in runs)


def to_json(res: Result) -> dict:
    """Stable object: the same inputs give the same JSON (no timings of the search itself)."""
    pred = res.prediction
    groups = {g: {k: v for k, v in d.items()} for g, d in sorted(pred.groups.items())}
    return {
        "step_time_s": round(pred.step_time_s, 6),
        "tokens_per_s": round(pred.tokens_per_s, 3),
        "mfu_total": round(pred.mfu, 4),
        "memory_gb": {g: d["memory_gb"] for g, d in groups.items()},
        "mfu": {g: d["mfu"] for g, d in groups.items()},
        "groups": groups,
        "breakdown": {k: round(v, 6) for k, v in pred.summary().items()},
        "layout": res.candidate.describe(),
        "recompute_granularity": res.options.recompute,
        "plan": {k: v for k, v in res.plan.items() if k != "predicted"},
        "stages": [{"group": s.group, "tensor_parallel": s.tp, "layers": s.layers, "fwd_s": round(s.fwd_s, 6),
                    "bwd_s": round(s.bwd_s, 6), "in_flight": s.inflight, "memory_gb": s.memory.as_gb()}
                   for s in pred.stages],
        "runner_up": res.why_runner_up_lost,
        **({"measured_step_time_s": res.plan["predicted"]["measured_step_time_s"]}  # --confirm ran
           if "measured_step_time_s" in (res.plan.get("predicted") or {}) else {}),
    }


def to_text(res: Result) -> str:
    pred, plan = res.prediction, res.plan
    lines = [f"layout: {res.candidate.describe()}, virtual stages {plan['virtual_stages']}",
             f"layers per stage: {plan['layers']}   expert parallel: {plan['expert_parallel']}",
             "pipelines:"]
    for n, mbs, m, stages in pipeline_summary(plan):
        lines.append(f"  {n:>6} x  micro-batch {mbs} x {m:<4} stages: {_compress(stages)}")
    lines.append("")
    lines.append(f"{'group':<14}{'devices':>9}{'used':>8}{'memory/rank GB':>17}{'limit':>8}{'TFLOP/s':>10}{'MFU':>8}")
    for g, d in pred.groups.items():
        lines.append(f"{g:<14}{d['devices']:>9}{d['devices_used']:>8}{d['memory_gb']:>17.3f}"
                     f"{d['memory_limit_gb']:>8g}{d['tflops']:>10.3f}{d['mfu'] * 100:>7.1f}%")
    lines.append("")
    lines.append(f"{'stage':<6}{'group':<14}{'TP':>4}{'layers':>8}{'fwd ms':>10}{'bwd ms':>10}{'in flight':>11}"
                 f"{'params GB':>11}{'grads GB':>10}{'optim GB':>10}{'activ GB':>10}{'total GB':>10}")
    for k, s in enumerate(pred.stages):
        m = s.memory.as_gb()
        lines.append(f"{k:<6}{s.group:<14}{s.tp:>4}{s.layers:>8}{s.fwd_s * 1e3:>10.2f}{s.bwd_s * 1e3:>10.2f}"
                     f"{s.inflight:>11}{m['params']:>11.3f}{m['grads']:>10.3f}{m['optimizer']:>10.3f}"
                     f"{m['activations']:>10.3f}{m['total']:>10.3f}")
    lines.append("")
    lines.append(f"predicted step time {pred.step_time_s:.4g} s (pipeline {pred.pipeline_time_s:.4g} s, bubble "
                 f"{pred.bubble * 100:.1f}%, exposed gradient reduction {pred.dp_exposed_s:.3g} s, optimizer "
                 f"{pred.optimizer_s:.3g} s); {pred.tokens_per_s:,.0f} tokens/s; MFU {pred.mfu * 100:.1f}%")
    if plan.get("recompute_layers") is not None:
        lines.append(f"per-stage recompute: full recompute of the first {plan['recompute_layers']} layers of each "
                     f"chunk of each stage (carried by the plan file; --plan applies it)")
    elif res.options.recompute:
        lines.append(f"train with --recompute-granularity {res.options.recompute}")
    if res.why_runner_up_lost:
        lines.append(res.why_runner_up_lost)
    lines.append(f"searched {res.evaluated} layouts, simulated {res.simulated} plans in {res.seconds:.2f} s")
    return "\n".join(lines)


def dumps(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, indent=1)


def write_figure(res: Result, path: str) -> None:
    """Groups x stages with their layers (top) and the slowest pipeline's simulated timeline (bottom)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MegahetError("--figure needs matplotlib; pip install matplotlib") from exc
    pred, plan = res.prediction, res.plan
    fig = Figure(figsize=(12, 6.5))
    FigureCanvasAgg(fig)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    names = sorted({s["group"] for p in plan["pipelines"] for s in p["stages"]})
    colors = {g: f"C{i}" for i, g in enumerate(names)}
    summary = pipeline_summary(plan)
    for row, (n, mbs, m, stages) in enumerate(summary):
        for k, st in enumerate(stages.split(" | ")):
            g = st.split("/tp")[0]
            top.barh(row, 1, left=k, color=colors[g], edgecolor="white")
            top.text(k + 0.5, row, f"{plan['layers'][k]}L", ha="center", va="center", fontsize=7, color="white")
    top.set_yticks(range(len(summary)))
    top.set_yticklabels([f"{n} x mb {mbs}x{m}" for n, mbs, m, _ in summary], fontsize=7)
    top.set_xlabel("pipeline stage (layers per stage inside)")
    top.set_title(f"plan: {res.candidate.describe()}", fontsize=9)
    for g in names:
        top.barh([], 0, color=colors[g], label=g)
    top.legend(fontsize=7, loc="upper right")
    timeline = pred.slowest.timeline if pred.slowest is not None else []
    for r, row in enumerate(timeline):
        g = pred.stages[r].group if r < len(pred.stages) else names[0]
        for a, start, end in row:
            bottom.barh(r, end - start, left=start, color=colors.get(g, "C0"),
                        alpha=1.0 if a.op == "fwd" else 0.55, edgecolor="black", linewidth=0.2)
    bottom.set_yticks(range(len(timeline)))
    bottom.set_yticklabels([f"stage {r}" for r in range(len(timeline))], fontsize=7)
    bottom.invert_yaxis()
    bottom.set_xlabel("seconds (dark: forward, light: backward)")
    bottom.set_title(f"simulated step of the slowest pipeline: {pred.pipeline_time_s:.3g} s, bubble "
                     f"{pred.bubble * 100:.1f}%; step {pred.step_time_s:.3g} s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
