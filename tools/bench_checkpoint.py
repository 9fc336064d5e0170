"""Benchmark: training stall per checkpoint save (sync vs --async-save) and save/load memory and time.

Stall: the real pretraining loop runs N iterations three ways — no saves, synchronous saves, async
saves — alternating (two rounds), and the stall per save is (elapsed with saves - elapsed without) /
saves. Elapsed is the loop's own clock at the last logged step, so start-up is excluded.
Memory and time: one rank saves and loads its state (weights + fp32 masters + Adam moments, after a
real optimizer step) with megahet's sharded format and, as the plain-PyTorch reference measured in the
same process, `torch.save`/`torch.load` of the model and optimizer state dicts. Extra memory is the peak
of anonymous resident memory (megahet.memory_probe) above its level before the call.

    python tools/bench_checkpoint.py [--hidden 384 --layers 6 --iters 13 --save-interval 3]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time

import torch

from megahet.config import build_config
from megahet.memory_probe import PeakSampler, exact_malloc_accounting
from megahet.parallel.context import single_process_context
from megahet.testing import run_distributed
from megahet.training import checkpoint as ckpt
from megahet.training.loss_scaler import build_loss_scaler
from megahet.training.model_builder import build_model_chunks
from megahet.training.optimizer_setup import build_optimizer
from megahet.training.pretrain import pretrain

MiB = 1 << 20


def model_flags(args) -> dict:
    return dict(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                num_attention_heads=args.hidden // 64, num_query_groups=args.hidden // 64, seq_length=64,
                mock_data=True, vocab_size=args.vocab, micro_batch_size=2, global_batch_size=8, lr=1e-4,
                log_interval=1, eval_interval=0, seed=1)


def train_run(over: dict) -> float:
    """One pretraining run; returns the loop's elapsed seconds at the last logged step."""
    cfg = build_config(overrides=over)
    pretrain(cfg)
    with open(cfg.logging.metrics_file) as fh:
        return [json.loads(line) for line in fh][-1]["elapsed_s"]


def memory_run(root: str, flags: dict) -> dict:
    """Save + load with megahet and with torch.save/torch.load in one process; times and extra memory."""
    exact_malloc_accounting()
    cfg = build_config(overrides={**flags, "train_iters": 1})
    ctx = single_process_context("cpu")
    vocab = flags["vocab_size"]
    chunks = build_model_chunks(cfg, ctx, vocab, -(-vocab // 128) * 128)
    ddp, opt = build_optimizer(cfg, ctx, chunks, build_loss_scaler(False, None, 2 ** 16))
    for buf in ddp.buffers:
        buf.data.normal_(0, 1e-3)
    opt.step()
    held = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    held += sum(sum(t.numel() * 4 for t in st.values()) for _, _, _, st in opt.owned_state())
    out = {"held_mib": held / MiB}

    def measure(name, fn):
        gc.collect()
        t0 = time.perf_counter()
        with PeakSampler() as s:
            fn()
        out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_extra_mib"] = s.extra / MiB

    ref = os.path.join(root, "torch_save.pt")
    for _ in range(2):  # alternate, so both see the same machine load
        shutil.rmtree(os.path.join(root, "mh"), ignore_errors=True)
        measure("megahet_save", lambda: ckpt.save_checkpoint(os.path.join(root, "mh"), 1, chunks, opt, ctx,
                                                             vocab_size=vocab, meta={"config": cfg.to_dict()}))
        measure("torch_save", lambda: torch.save({"model": chunks[0].state_dict(),
                                                  "optim": opt.optimizer.state_dict()}, ref))
        measure("megahet_load", lambda: ckpt.load_checkpoint(os.path.join(root, "mh"), chunks, opt, ctx,
                                                             vocab_size=vocab))
        measure("torch_load", lambda: torch.load(ref, weights_only=True))
    out["file_mib"] = sum(os.path.getsize(os.path.join(root, "mh", "iter_0000001", f))
                          for f in os.listdir(os.path.join(root, "mh", "iter_0000001"))) / MiB
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--iters", type=int, default=13)
    ap.add_argument("--save-interval", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    flags = model_flags(args)
    work = tempfile.mkdtemp(prefix="megahet_bench_ckpt_")
    try:
        mem = run_distributed(memory_run, 1, work, flags, timeout=600)[0]
        print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; rank state "
              f"(weights + masters + Adam) {mem['held_mib']:.0f} MiB, checkpoint files {mem['file_mib']:.0f} MiB")
        print(f"{'':14}{'megahet':>10}{'torch.save/load':>18}{'ratio':>8}   extra memory megahet / torch")
        for op in ("save", "load"):
            a, b = mem[f"megahet_{op}_s"], mem[f"torch_{op}_s"]
            print(f"{op + ' time (s)':14}{a:10.3f}{b:18.3f}{a / b:8.2f}   "
                  f"{mem[f'megahet_{op}_extra_mib']:.1f} MiB / {mem[f'torch_{op}_extra_mib']:.1f} MiB")
        saves = (args.iters - 1) // args.save_interval  # the final save comes after the last measured step
        elapsed = {"none": [], "sync": [], "async": []}
        for r in range(args.rounds):
            for mode in elapsed:
                over = {**flags, "train_iters": args.iters,
                        "metrics_file": os.path.join(work, f"{mode}{r}.jsonl")}
                if mode != "none":
                    over.update(save=os.path.join(work, f"ck_{mode}{r}"), save_interval=args.save_interval,
                                async_save=mode == "async")
                elapsed[mode].append(run_distributed(train_run, 1, over, timeout=1200)[0])
        base = min(elapsed["none"])
        print(f"training {args.iters} iterations, {saves} saves measured (best of {args.rounds} alternating rounds):")
        print(f"  no saves {base:.2f} s; step {base / args.iters:.3f} s")
        for mode in ("sync", "async"):
            t = min(elapsed[mode])
            print(f"  {mode:5} saves {t:.2f} s; stall per save {(t - base) / saves:.3f} s "
                  f"({(t - base) / saves / (base / args.iters):.2f} steps)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
