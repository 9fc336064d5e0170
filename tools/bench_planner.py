"""Planner validation: published large runs, planning time at 50,000 cards, two sites, memory exactness.

    python tools/bench_planner.py                 # every section below
    python tools/bench_planner.py --only published

Sections:
- published: the GPT models of Narayanan et al. 2021 (Megatron-LM, Table 1, A100) and Llama 3 405B
  (Table 4, H100), each fed its published TP / PP / DP and global batch (micro-batch size and virtual
  stages are searched, as the papers tuned them); predicted TFLOP/s per GPU against the published one.
- scale: wall time to plan the 51,200-card A100 + H20 + Ascend 910B cluster for the ~1T MoE, one site
  and two sites.
- memory: the cost model's parameter count per rank against the real model built on the `meta` device
  for chosen ranks (TP / EP shards, first / middle / last stage).
The measured cpu+sim comparison is tools/bench_planner_measured.py's job (it runs real training).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megahet.config import build_config  # noqa: E402
from megahet.hetero import cost_model as cm  # noqa: E402
from megahet.hetero.autoplan import plan_job  # noqa: E402
from megahet.hetero.cluster import load_cluster  # noqa: E402
from megahet.hetero.planner import Settings  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "examples", "configs")

# Narayanan et al. 2021, Table 1: (params B, heads, hidden, layers, TP, PP, GPUs, batch, TFLOP/s per GPU).
MEGATRON_2021 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]
# Llama 3 405B, Table 4: (GPUs, TP, PP, DP, TFLOP/s per GPU).
LLAMA3 = [(8192, 8, 16, 64, 430), (16384, 8, 16, 128, 400)]


class _Cluster:
    def __init__(self, base, devices):
        g = base.groups[0]
        from dataclasses import replace
        self.groups = [replace(g, devices=devices)]
        self.links = base.links


def megatron_flops(batch, seq, layers, hidden, vocab):
    """The paper's FLOPs per iteration (with activation recomputation): 96 B s l h^2 (1 + s/6h + V/16lh)."""
    return 96 * batch * seq * layers * hidden ** 2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


def published():
    print("## Megatron-LM 2021 (Table 1), A100-80GB, full recompute, fp16; predicted vs published TFLOP/s per GPU")
    print(f"{'params':>8} {'TP':>3} {'PP':>3} {'DP':>4} {'GPUs':>5} {'batch':>5} {'plan (mbs, v)':>14} "
          f"{'pred TFLOP/s':>12} {'paper':>6} {'error':>7} {'plan s':>7}")
    base = load_cluster(os.path.join(CONFIGS, "cluster_a100_3072.yaml"))
    errors = []
    for params, heads, hidden, layers, tp, pp, gpus, batch, paper in MEGATRON_2021:
        dp = gpus // (tp * pp)
        cfg = build_config(overrides=dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                          ffn_hidden_size=4 * hidden, seq_length=2048, vocab_size=51200,
                                          normalization="LayerNorm", swiglu=False,
                                          position_embedding_type="learned_absolute", disable_bias_linear=False,
                                          fp16=True, global_batch_size=batch, micro_batch_size=1), validate=False)
        cfg.parallel.sequence_parallel = False  # 2021: no sequence parallelism, no fused attention
        given = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, data_parallel_size=dp)
        t0 = time.perf_counter()
        res = plan_job(cfg, _Cluster(base, gpus), dict(given, recompute_granularity="full"), measure=False,
                       settings=Settings(micro_batch_sizes=(1, 2, 4, 8), per_stage_recompute=False),
                       flash_attention=False)  # the paper recomputes every layer of every stage
        dt = time.perf_counter() - t0
        pred = megatron_flops(batch, 2048, layers, hidden, 51200) / res.prediction.step_time_s / gpus / 1e12
        err = pred / paper - 1
        errors.append(abs(err))
        shape = f"({res.plan['pipelines'][0]['micro_batch_size']}, {res.plan['virtual_stages']})"
        print(f"{params:>7}B {tp:>3} {pp:>3} {dp:>4} {gpus:>5} {batch:>5} {shape:>14} "
              f"{pred:>12.1f} {paper:>6} {err * 100:>+6.1f}% {dt:>7.2f}")
    print(f"mean |error| {sum(errors) / len(errors) * 100:.1f}%, max {max(errors) * 100:.1f}%\n")
    print("## Llama 3 405B (Table 4), H100-80GB, bf16, 16M-token batches; model TFLOP/s per GPU")
    print(f"{'GPUs':>6} {'TP':>3} {'PP':>3} {'DP':>4} {'plan (mbs, v, recompute)':>26} {'pred TFLOP/s':>12} "
          f"{'error':>7} {'same plan, no recompute':>24} {'error':>7} {'its memory GB':>13} {'paper':>6}")
    cfg = build_config(yaml_path=os.path.join(CONFIGS, "llama3_405b.yaml"), validate=False)
    spec = cm.ModelSpec.from_config(cfg)
    from megahet.hetero.planner import cluster_groups
    from megahet.hetero.predict import Options, predict
    from megahet.training.flops import transformer_flops_per_token
    f_tok = transformer_flops_per_token(spec.num_layers, spec.hidden, spec.ffn, spec.heads, spec.query_groups,
                                        spec.seq, spec.vocab, True, None, 2, None, None, None)
    for gpus, tp, pp, dp, paper in LLAMA3:
        base = load_cluster(os.path.join(CONFIGS, f"cluster_h100_{gpus // 1024}k.yaml"))
        res = plan_job(cfg, base, dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                       data_parallel_size=dp), measure=False)
        pred = f_tok * res.prediction.tokens_per_s / gpus / 1e12
        no_rc = {k: v for k, v in res.plan.items() if k != "recompute_layers"}
        bare = predict(no_rc, spec, cluster_groups(base), cm.Links.from_cluster(base.links),
                       Options(None, True, True))
        bare_tf = f_tok * bare.tokens_per_s / gpus / 1e12
        mem = max(s.memory.total for s in bare.stages) / cm.GB
        mbs = res.plan["pipelines"][0]["micro_batch_size"]
        rc = res.options.recompute or "none"
        if "recompute_layers" in res.plan:  # per stage: full recompute of each chunk's first N layers
            rc = "block " + ",".join(map(str, res.plan["recompute_layers"]))
        desc = f"({mbs}, {res.plan['virtual_stages']}, {rc})"
        print(f"{gpus:>6} {tp:>3} {pp:>3} {dp:>4} {desc:>26} {pred:>12.1f} {(pred / paper - 1) * 100:>+6.1f}% "
              f"{bare_tf:>24.1f} {(bare_tf / paper - 1) * 100:>+6.1f}% {mem:>13.0f} {paper:>6}")
    print()


def scale():
    print("## Planning the ~1T MoE (examples/configs/moe_1t.yaml) on 51,200 mixed cards")
    cfg = build_config(yaml_path=os.path.join(CONFIGS, "moe_1t.yaml"), validate=False)
    for name in ("cluster_50k_mixed.yaml", "cluster_50k_two_sites.yaml"):
        cluster = load_cluster(os.path.join(CONFIGS, name))
        t0 = time.perf_counter()
        res = plan_job(cfg, cluster, {}, measure=False)
        dt = time.perf_counter() - t0
        p = res.prediction
        print(f"{name}: {dt:.1f} s to plan ({res.evaluated} layouts scored, {res.simulated} simulated); "
              f"{res.candidate.describe()}, v {res.plan['virtual_stages']}; step {p.step_time_s:.3f} s, "
              f"{p.tokens_per_s / 1e6:.2f}M tokens/s, MFU {p.mfu * 100:.1f}%")
    print()


def memory():
    from megahet.hetero.memory_check import compare_cases
    print("## Parameters per rank: cost model vs the real model built on the meta device")
    print(f"{'case':<44} {'rank':<28} {'model':>12} {'cost model':>12}")
    for case, rank, real, predicted in compare_cases():
        print(f"{case:<44} {rank:<28} {real:>12,} {predicted:>12,}")
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["published", "scale", "memory"], default=None)
    args = ap.parse_args()
    for name, fn in (("published", published), ("scale", scale), ("memory", memory)):
        if args.only in (None, name):
            fn()


if __name__ == "__main__":
    main()
