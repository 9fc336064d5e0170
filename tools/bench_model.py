"""Benchmark: training-step tokens/s and peak memory of megahet's GPT vs a plain-PyTorch model.

Shapes (--shapes):
  vocab  hidden 256, 4 layers, 4 heads, seq 256, micro-batch 8, vocab 32000 (the head dominates)
  block  hidden 512, 6 layers, 8 heads, seq 256, micro-batch 4, vocab 4096 (the layers dominate)
  moe    hidden 256, 4 layers, 4 heads, seq 256, micro-batch 4, vocab 4096, 8 experts top-2 (ffn 512),
         against a plain per-expert loop

The plain model is written here from torch.nn primitives with the same architecture (fused QKV,
RoPE, SDPA, SwiGLU, RMSNorm, tied embeddings) and its best stock settings: the same AdamW kernel as
megahet (fused where torch has one, --optimizer-implementation), foreach gradient clipping.
Precision recipes (`--dtypes`):
  fp32  both fp32.
  bf16  megahet: Megatron's recipe, bf16 params and activations, fp32 master weights, fp32 gradient
        buffer (norm, softmax, RoPE and the loss computed in fp32; MoE router fp32).
        plain: the usual torch.autocast(bfloat16) recipe, fp32 params, grads and AdamW; autocast
        casts the weights to bf16 for each matmul and runs the norms/loss in fp32.
        The recipes differ in where the fp32 copy lives; memory compares them as they are.

Both models run in this process, measured alternately (megahet, plain, plain, megahet, ...) so
machine-speed drifts (other jobs on a shared machine) hit both alike; the median step is reported.
Peak memory is measured in a fresh subprocess per model (peak resident set minus the resident set
before the model is built on CPU; the backend's peak allocation on accelerators). The breakdown
times megahet's step phases (forward, backward, gradient sync, norm/clip, optimizer) in separate
steps, not the timed ones. Minor page faults per step show allocator churn (--host-allocator).
"CPU ms/step" is the process CPU time (all threads) of the same timed steps, and "CPU ratio"
plain / megahet of it: on a shared machine it is not inflated by waiting for a core as wall time is
(threads spinning while they wait still count).

    python tools/bench_model.py [--shapes vocab,block,moe] [--dtypes fp32,bf16] [--iters 10]
                                [--host-allocator retain] [--compile] [--backend cpu]
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from megahet.config import build_config
from megahet.device import host_memory_stats
from megahet.host_allocator import configure_host_allocator
from megahet.parallel.context import single_process_context
from megahet.training.loss_scaler import build_loss_scaler
from megahet.training.model_builder import build_model_chunks, build_moe_tracker
from megahet.training.optimizer import optimizer_flags
from megahet.training.optimizer_setup import build_optimizer
from megahet.training.timers import Timers
from megahet.training.train_step import train_step

SHAPES = {
    "vocab": dict(hidden=256, layers=4, heads=4, seq=256, mbs=8, vocab=32000),
    "block": dict(hidden=512, layers=6, heads=8, seq=256, mbs=4, vocab=4096),
    "moe": dict(hidden=256, layers=4, heads=4, seq=256, mbs=4, vocab=4096, experts=8, topk=2, moe_ffn=512),
}
PHASES = ("forward", "backward", "grad-sync", "norm-clip", "optimizer")


# ---------------------------------------------------------------------- the plain reference
class PlainMLP(nn.Module):
    def __init__(self, h, ffn):
        super().__init__()
        self.fc1 = nn.Linear(h, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, h, bias=False)

    def forward(self, x):
        gate, up = self.fc1(x).chunk(2, -1)
        return self.fc2(F.silu(gate) * up)


class PlainMoE(nn.Module):
    """Mixtral routing (fp32 softmax over experts, top-k, renormalised), then a loop over experts."""

    def __init__(self, h, experts, topk, ffn):
        super().__init__()
        self.topk = topk
        self.router = nn.Linear(h, experts, bias=False)
        self.experts = nn.ModuleList(PlainMLP(h, ffn) for _ in range(experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, h]
        probs = torch.softmax(self.router(x), dim=-1, dtype=torch.float32)  # [N, E]
        weights, idx = probs.topk(self.topk, dim=-1)  # [N, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(idx == e)
            if rows.numel():
                y = expert(x[rows]) * weights[rows, slot, None].to(x.dtype)  # [n_e, h]
                out.index_add_(0, rows, y.to(out.dtype))
        return out.view(shape)


class PlainBlock(nn.Module):
    def __init__(self, h, heads, ffn, moe=None):
        super().__init__()
        self.heads, self.d = heads, h // heads
        self.norm1, self.norm2 = nn.RMSNorm(h, eps=1e-5), nn.RMSNorm(h, eps=1e-5)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.proj = nn.Linear(h, h, bias=False)
        self.mlp = PlainMoE(h, **moe) if moe else PlainMLP(h, ffn)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, self.d).transpose(1, 3).unbind(2)

        def rope(t):
            t1, t2 = t.chunk(2, -1)
            return t * cos + torch.cat([-t2, t1], -1) * sin
        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)  # [b, n, s, d]
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


class PlainGPT(nn.Module):
    def __init__(self, sh, ffn):
        super().__init__()
        h = sh["hidden"]
        moe = dict(experts=sh["experts"], topk=sh["topk"], ffn=sh["moe_ffn"]) if "experts" in sh else None
        self.emb = nn.Embedding(sh["vocab"], h)
        self.blocks = nn.ModuleList(PlainBlock(h, sh["heads"], ffn, moe) for _ in range(sh["layers"]))
        self.norm = nn.RMSNorm(h, eps=1e-5)
        d = h // sh["heads"]
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        f = torch.outer(torch.arange(sh["seq"]).float(), inv)
        emb = torch.cat([f, f], -1)
        self.register_buffer("cos", emb.cos()[None, None])
        self.register_buffer("sin", emb.sin()[None, None])
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, labels):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        logits = F.linear(self.norm(x), self.emb.weight)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))


# ---------------------------------------------------------------------- the two sides
def make_batches(sh, n, device):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        t = torch.randint(0, sh["vocab"], (sh["mbs"], sh["seq"] + 1), generator=g)
        out.append({"tokens": t[:, :-1].contiguous().to(device), "labels": t[:, 1:].contiguous().to(device),
                    "loss_mask": torch.ones(sh["mbs"], sh["seq"])})
    return out


def megahet_config(sh, bf16, args):
    over = dict(num_layers=sh["layers"], hidden_size=sh["hidden"], num_attention_heads=sh["heads"],
                seq_length=sh["seq"], vocab_size=sh["vocab"], make_vocab_size_divisible_by=1, mock_data=True,
                train_iters=1, bf16=bf16, micro_batch_size=sh["mbs"], global_batch_size=sh["mbs"], lr=1e-4,
                min_lr=0.0, weight_decay=0.1, clip_grad=1.0, optimizer_implementation=args.optimizer_implementation,
                compile=args.compile)
    if "experts" in sh:
        over.update(num_experts=sh["experts"], moe_router_topk=sh["topk"], moe_ffn_hidden_size=sh["moe_ffn"])
    return build_config(overrides=over)


def build_megahet(sh, bf16, args):
    """A step function of megahet's single-rank training step, and the dense ffn size."""
    cfg = megahet_config(sh, bf16, args)
    ctx = single_process_context(args.backend)
    tracker = build_moe_tracker(cfg)
    chunks = build_model_chunks(cfg, ctx, sh["vocab"], sh["vocab"], tracker)
    scaler = build_loss_scaler(False)
    ddp, opt = build_optimizer(cfg, ctx, chunks, scaler)

    def step(batch, timers=None, tracer=None):
        return train_step(chunks, ddp, opt, ctx, [batch], schedule="afab", loss_scaler=scaler, moe_tracker=tracker,
                          timers=timers, tracer=tracer).loss
    return step, cfg.model.ffn_hidden_size, ctx


def build_plain(sh, bf16, ffn, args, ctx):
    device = ctx.device
    model = PlainGPT(sh, ffn).to(device)
    if args.compile:
        for i, blk in enumerate(model.blocks):
            model.blocks[i] = torch.compile(blk)
    flags = optimizer_flags(args.optimizer_implementation, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **flags)

    def step(batch, timers=None, tracer=None):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch["tokens"], batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        return float(loss.detach())
    return step


class PhaseTracer:
    """Adds the wall time of forward and backward actions (the schedule executor's tracer hooks)."""

    def __init__(self, timers):
        self.timers = timers

    def begin(self, action):
        if action.op in ("fwd", "bwd"):
            self.timers("forward" if action.op == "fwd" else "backward").start()

    def end(self, action):
        if action.op in ("fwd", "bwd"):
            self.timers("forward" if action.op == "fwd" else "backward").stop()


# ---------------------------------------------------------------------- measurements
def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_speed(sh, bf16, args):
    """Alternating timed steps; returns tokens/s and faults/step of both sides, and megahet's phases."""
    mh_step, ffn, ctx = build_megahet(sh, bf16, args)
    plain_step = build_plain(sh, bf16, ffn, args, ctx)
    batches = make_batches(sh, 2, ctx.device)
    sync = ctx.backend.synchronize
    for _ in range(args.warmup):
        mh_step(batches[0])
        plain_step(batches[0])
    times, faults = {"megahet": [], "plain": []}, {"megahet": [], "plain": []}
    cpu = {"megahet": [], "plain": []}  # process CPU time: what waiting for a core does not inflate
    for i in range(args.iters):
        order = (("megahet", mh_step), ("plain", plain_step))
        for name, fn in order if i % 2 == 0 else order[::-1]:
            sync()
            f0, t0, c0 = minor_faults(), time.perf_counter(), time.process_time()
            loss = fn(batches[i % 2])
            sync()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            faults[name].append(minor_faults() - f0)
            if not math.isfinite(loss):
                raise RuntimeError(f"{name} loss is {loss}")
    timers = Timers(sync)
    tracer = PhaseTracer(timers)
    for i in range(args.breakdown_iters):
        mh_step(batches[i % 2], timers=timers, tracer=tracer)
    n = max(1, args.breakdown_iters)
    phases = {k: timers.elapsed(k) / n for k in PHASES if k in timers}
    tokens = sh["mbs"] * sh["seq"]
    return {"tok_s": {k: tokens / statistics.median(v) for k, v in times.items()},
            "faults": {k: statistics.median(v) for k, v in faults.items()},
            "step_s": {k: statistics.median(v) for k, v in times.items()},
            "cpu_s": {k: statistics.median(v) for k, v in cpu.items()}, "phases": phases}


def measure_memory_here(side, shape, dtype, args):
    """(Subprocess) peak memory in MiB of `side` training `shape` for a few steps."""
    sh, bf16 = SHAPES[shape], dtype == "bf16"
    ctx = single_process_context(args.backend)
    batches = make_batches(sh, 2, ctx.device)
    on_host = ctx.device.type == "cpu"
    ctx.backend.reset_peak_memory()
    base = host_memory_stats()["allocated_gb"] if on_host else ctx.backend.memory_stats(ctx.device)["allocated_gb"]
    if side == "megahet":
        step = build_megahet(sh, bf16, args)[0]
    else:
        cfg = megahet_config(sh, bf16, args)
        step = build_plain(sh, bf16, cfg.model.ffn_hidden_size, args, ctx)
    for i in range(3):
        step(batches[i % 2])
    ctx.backend.synchronize()
    peak = host_memory_stats()["peak_gb"] if on_host else ctx.backend.memory_stats(ctx.device)["peak_gb"]
    return (peak - base) * 1024.0


def measure_memory(side, shape, dtype, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory", f"{side},{shape},{dtype}", "--backend", args.backend,
           "--host-allocator", args.host_allocator, "--optimizer-implementation", args.optimizer_implementation]
    if args.compile:
        cmd.append("--compile")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def optimizer_state_mib(sh, args):
    """fp32 Adam moments (exp_avg, exp_avg_sq) that both sides keep, in MiB."""
    cfg = megahet_config(sh, False, args)
    ctx = single_process_context("cpu")
    chunks = build_model_chunks(cfg, ctx, sh["vocab"], sh["vocab"], build_moe_tracker(cfg))
    n = sum(p.numel() for c in chunks for p in c.parameters())
    return 2 * 4 * n / 2 ** 20, n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="vocab,block,moe")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--breakdown-iters", type=int, default=2)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--optimizer-implementation", default="auto")
    ap.add_argument("--host-allocator", default="default", choices=["default", "retain"])
    ap.add_argument("--compile", action="store_true", help="torch.compile every transformer layer on both sides")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    applied = configure_host_allocator(args.host_allocator)
    if args._memory:
        side, shape, dtype = args._memory.split(",")
        print(json.dumps({"peak_mib": measure_memory_here(side, shape, dtype, args)}))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}, "
          f"host allocator {args.host_allocator}{' (applied)' if applied else ''}, "
          f"AdamW {optimizer_flags(args.optimizer_implementation, torch.device('cpu'))}, compile {args.compile}")
    head = (f"{'shape':6} {'dtype':5} {'megahet tok/s':>13} {'plain tok/s':>11} {'ratio':>6} "
            f"{'faults/step mh|plain':>21} {'peak MiB mh|plain':>18} {'Adam MiB':>8} {'CPU ms/step mh|plain':>21} "
            f"{'CPU ratio':>9}")
    rows, breakdowns = [], []
    print(head)
    for shape in args.shapes.split(","):
        sh = SHAPES[shape]
        adam_mib, nparams = optimizer_state_mib(sh, args)
        for dtype in args.dtypes.split(","):
            r = measure_speed(sh, dtype == "bf16", args)
            mem = ("-", "-") if args.no_memory else tuple(
                f"{measure_memory(side, shape, dtype, args):.0f}" for side in ("megahet", "plain"))
            ratio = r["tok_s"]["megahet"] / r["tok_s"]["plain"]
            rows.append(f"{shape:6} {dtype:5} {r['tok_s']['megahet']:13.0f} {r['tok_s']['plain']:11.0f} {ratio:6.2f} "
                        f"{r['faults']['megahet']:>10.0f}|{r['faults']['plain']:<10.0f} "
                        f"{mem[0]:>8}|{mem[1]:<9} {adam_mib:8.0f} "
                        f"{r['cpu_s']['megahet'] * 1e3:>10.0f}|{r['cpu_s']['plain'] * 1e3:<10.0f} "
                        f"{r['cpu_s']['plain'] / r['cpu_s']['megahet']:9.2f}")
            total = r["step_s"]["megahet"]
            parts = " | ".join(f"{k} {v * 1e3:.0f}" for k, v in r["phases"].items())
            breakdowns.append(f"{shape:6} {dtype:5} step {total * 1e3:.0f} ms (timed median); phases (ms): {parts}")
            print(rows[-1], flush=True)
    print("\nmegahet step breakdown (separate steps, forward/backward per schedule action):")
    print("\n".join(breakdowns))


if __name__ == "__main__":
    main()
