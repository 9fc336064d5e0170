"""Benchmark: training-step tokens/s of megahet's GPT vs a plain-PyTorch model of the same architecture.

Both run in this process on the CPU backend, measured alternately (A, B, A, B, ...) so drifts in the
machine's speed hit both equally. The plain model is written here from torch.nn primitives: fused
QKV, RoPE, GQA via scaled_dot_product_attention, SwiGLU, RMSNorm, tied embeddings, AdamW.
fp32: both in fp32. bf16: megahet with --bf16 (bf16 params, fp32 master weights and grads);
the reference with fp32 params under torch.autocast(bfloat16), the usual PyTorch recipe.

    python tools/bench_model.py [--hidden 256 --layers 4 --heads 4 --seq 256 --mbs 8 --vocab 32000]
"""
import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from megahet.config import build_config
from megahet.parallel.context import single_process_context
from megahet.training.loss_scaler import build_loss_scaler
from megahet.training.model_builder import build_model_chunks
from megahet.training.optimizer_setup import build_optimizer
from megahet.training.train_step import train_step


class PlainBlock(nn.Module):
    def __init__(self, h, heads, kv_heads, ffn):
        super().__init__()
        self.heads, self.kv, self.d = heads, kv_heads, h // heads
        self.norm1, self.norm2 = nn.RMSNorm(h, eps=1e-5), nn.RMSNorm(h, eps=1e-5)
        self.qkv = nn.Linear(h, (heads + 2 * kv_heads) * self.d, bias=False)
        self.proj = nn.Linear(h, h, bias=False)
        self.fc1 = nn.Linear(h, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, h, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split([self.heads * self.d, self.kv * self.d, self.kv * self.d], -1)
        q = q.view(b, s, self.heads, self.d).transpose(1, 2)
        k = k.view(b, s, self.kv, self.d).transpose(1, 2)
        v = v.view(b, s, self.kv, self.d).transpose(1, 2)

        def rope(t):
            t1, t2 = t.chunk(2, -1)
            return t * cos + torch.cat([-t2, t1], -1) * sin
        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True, enable_gqa=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.fc1(self.norm2(x)).chunk(2, -1)
        return x + self.fc2(F.silu(gate) * up)


class PlainGPT(nn.Module):
    def __init__(self, vocab, h, layers, heads, kv_heads, ffn, seq):
        super().__init__()
        self.emb = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList(PlainBlock(h, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(h, eps=1e-5)
        d = h // heads
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        f = torch.outer(torch.arange(seq).float(), inv)
        emb = torch.cat([f, f], -1)
        self.register_buffer("cos", emb.cos()[None, None])
        self.register_buffer("sin", emb.sin()[None, None])
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, labels):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, self.cos.to(x.dtype), self.sin.to(x.dtype))
        logits = F.linear(self.norm(x), self.emb.weight)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))


def make_batches(args, n):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        t = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), generator=g)
        out.append({"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
                    "loss_mask": torch.ones(args.mbs, args.seq)})
    return out


def build_megahet(args, bf16):
    cfg = build_config(overrides=dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                                      num_query_groups=args.kv_heads, seq_length=args.seq, vocab_size=args.vocab,
                                      make_vocab_size_divisible_by=1, mock_data=True, train_iters=1, bf16=bf16,
                                      micro_batch_size=args.mbs, global_batch_size=args.mbs, lr=1e-4, min_lr=0.0,
                                      weight_decay=0.1, clip_grad=1.0))
    ctx = single_process_context("cpu")
    chunks = build_model_chunks(cfg, ctx, args.vocab, args.vocab)
    scaler = build_loss_scaler(False)
    ddp, opt = build_optimizer(cfg, ctx, chunks, scaler)

    def step(batch):
        return train_step(chunks, ddp, opt, ctx, [batch], schedule="afab", loss_scaler=scaler).loss
    return step, cfg.model.ffn_hidden_size


def build_plain(args, bf16, ffn):
    model = PlainGPT(args.vocab, args.hidden, args.layers, args.heads, args.kv_heads, ffn, args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch["tokens"], batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())
    return step


def measure(args, bf16):
    batches = make_batches(args, 2)
    mh_step, ffn = build_megahet(args, bf16)
    plain_step = build_plain(args, bf16, ffn)
    for _ in range(args.warmup):
        mh_step(batches[0])
        plain_step(batches[0])
    times = {"megahet": [], "plain": []}
    for i in range(args.iters):
        for name, fn in (("megahet", mh_step), ("plain", plain_step)) if i % 2 == 0 else (("plain", plain_step), ("megahet", mh_step)):
            t0 = time.perf_counter()
            loss = fn(batches[i % 2])
            times[name].append(time.perf_counter() - t0)
            assert math.isfinite(loss)
    tokens = args.mbs * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    return {k: tokens / v for k, v in med.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    print(f"shape: hidden {args.hidden}, layers {args.layers}, heads {args.heads}, seq {args.seq}, "
          f"micro-batch {args.mbs}, vocab {args.vocab}; torch threads {torch.get_num_threads()}")
    print(f"{'dtype':6} {'megahet tok/s':>14} {'plain tok/s':>12} {'ratio':>7}")
    for dt in args.dtypes.split(","):
        r = measure(args, dt == "bf16")
        print(f"{dt:6} {r['megahet']:14.0f} {r['plain']:12.0f} {r['megahet'] / r['plain']:7.2f}")


if __name__ == "__main__":
    main()
