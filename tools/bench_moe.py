#!/usr/bin/env python
"""Benchmark: MoE GPT forward+backward tokens/s under expert parallelism, vs a dense equivalent.

Every layout runs on this machine through megahet.testing.run_distributed (gloo ranks) and uses all of
it: one rank gets every core as threads, n ranks get cores/n threads each. Each data-parallel rank
trains on its own micro-batch, so tokens/step grows with the rank count. Rows:
  - MoE EP=1 on one rank; MoE with replicated experts (EP=1, DP=2); MoE EP=2 (DP=2) with the alltoall
    and the allgather dispatcher;
  - a dense model with the same active parameters per token (ffn = topk * moe-ffn (+ shared)), 1 and
    2 ranks.
The machine may be shared, so layouts run interleaved for --rounds rounds and each row keeps its
fastest step (the least disturbed one; the median is shown too). "dispatch %" is the share of that
step spent in dispatch + combine (permutation and EP communication, forward and backward), timed
inside the MoE layers with their `profile` flag.

    python tools/bench_moe.py [--layers 4 --hidden 256 --experts 8 --topk 2 --moe-ffn 512 --seq 256 --mbs 4]
"""
import argparse
import os
import statistics
import time

import torch

from megahet.config import build_config
from megahet.models.gpt import GPTModel
from megahet.moe.layer import MoELayer
from megahet.parallel.context import build_parallel_context
from megahet.testing import run_distributed
from megahet.training.model_builder import build_moe_tracker


def _config(args, moe: bool, ep: int, dispatcher: str):
    over = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                seq_length=args.seq, vocab_size=args.vocab, make_vocab_size_divisible_by=1, mock_data=True,
                tokenizer_type="NullTokenizer", train_iters=1, expert_model_parallel_size=ep)
    if moe:
        over.update(num_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.moe_ffn,
                    moe_shared_expert_intermediate_size=args.shared or None, moe_token_dispatcher_type=dispatcher,
                    moe_aux_loss_coeff=0.01)
    else:
        over.update(ffn_hidden_size=args.topk * args.moe_ffn + args.shared)
    return build_config(overrides=over)


def bench_rank(args, moe: bool, ep: int, dispatcher: str) -> dict:
    """One rank: warmup + measured forward/backward steps; per-step seconds and dispatch seconds."""
    ctx = build_parallel_context(ep=ep, backend_name="cpu", timeout_s=600)
    cfg = _config(args, moe, ep, dispatcher)
    model = GPTModel(cfg.model, ctx, layer_ids=range(cfg.model.num_layers), pre_process=True, post_process=True,
                     vocab_size=args.vocab, padded_vocab_size=args.vocab, seed=1234,
                     moe_tracker=build_moe_tracker(cfg))
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layer.profile = True
    g = torch.Generator().manual_seed(ctx.dp_rank)
    data = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), generator=g)
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    steps, dispatch = [], []
    for i in range(args.warmup + args.steps):
        model.zero_grad(set_to_none=True)
        for layer in layers:
            layer.stopwatch.reset()
        ctx.world_group.barrier()  # ranks start each step together: step time = slowest rank
        t0 = time.perf_counter()
        loss = model(tokens, labels=labels)
        (loss.sum() / loss.numel()).backward()
        elapsed = time.perf_counter() - t0
        if i >= args.warmup:
            steps.append(elapsed)
            dispatch.append(sum(sum(layer.stopwatch.seconds.values()) for layer in layers))
    params = sum(p.numel() for p in model.parameters())
    return {"steps": steps, "dispatch": dispatch, "params": params}


def run_layout(args, name, ranks, moe, ep=1, dispatcher="alltoall"):
    threads = max(1, args.cores // ranks)
    results = run_distributed(bench_rank, ranks, args, moe, ep, dispatcher, timeout=1800,
                              env={"MEGAHET_TEST_THREADS": str(threads)})
    step = [max(r["steps"][i] for r in results) for i in range(args.steps)]  # slowest rank per step
    best = min(range(args.steps), key=step.__getitem__)
    share = max(r["dispatch"][best] / r["steps"][best] for r in results)
    t = step[best]
    tokens = ranks * args.mbs * args.seq
    return {"layout": name, "ranks": ranks, "threads": threads, "tokens": tokens, "step_ms": 1e3 * t,
            "median_ms": 1e3 * statistics.median(step), "tokens_per_s": tokens / t,
            "dispatch": share if moe else None, "params": results[0]["params"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--moe-ffn", type=int, default=512)
    p.add_argument("--shared", type=int, default=0, help="shared expert size (0: none)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every layout")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    layouts = [("MoE EP=1", 1, True, 1, "alltoall"),
               ("MoE EP=1 DP=2 (replicated experts)", 2, True, 1, "alltoall"),
               ("MoE EP=2 DP=2 alltoall", 2, True, 2, "alltoall"),
               ("MoE EP=2 DP=2 allgather", 2, True, 2, "allgather"),
               ("dense equivalent", 1, False, 1, "alltoall"),
               ("dense equivalent DP=2", 2, False, 1, "alltoall")]
    best = {}
    for _ in range(args.rounds):
        for name, ranks, moe, ep, dispatcher in layouts:
            row = run_layout(args, name, ranks, moe, ep, dispatcher)
            if name not in best or row["step_ms"] < best[name]["step_ms"]:
                best[name] = row
    rows = [best[name] for name, *_ in layouts]
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-{args.topk} "
          f"ffn {args.moe_ffn}{f' + shared {args.shared}' if args.shared else ''}; dense equivalent ffn "
          f"{args.topk * args.moe_ffn + args.shared}; seq {args.seq}, micro-batch {args.mbs} per rank; "
          f"{args.cores} cores; fastest of {args.rounds} x {args.steps} steps")
    print(f"{'layout':38} {'ranks x thr':>11} {'params/rank':>12} {'tokens/step':>11} {'step ms':>9} "
          f"{'median ms':>9} {'tokens/s':>9} {'dispatch %':>10}")
    for r in rows:
        share = f"{100 * r['dispatch']:.1f}" if r["dispatch"] is not None else "-"
        print(f"{r['layout']:38} {r['ranks']:>7} x {r['threads']:<2} {r['params'] / 1e6:>11.2f}M {r['tokens']:>11} "
              f"{r['step_ms']:>9.1f} {r['median_ms']:>9.1f} {r['tokens_per_s']:>9.0f} {share:>10}")


if __name__ == "__main__":
    main()
