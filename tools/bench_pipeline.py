"""Benchmark: measured pipeline bubble vs theory, and activation memory per stage with/without recompute.

Bubble: a real forward/backward over m micro-batches on pp ranks (gloo, one process per stage),
every action timed; bubble = idle share of the compute span (schedule_trace.bubble_fraction), theory
(p-1)/(v*m+p-1). With more stages than cores the ranks would fight for CPUs and distort compute
times, so those runs use the `sim` backend at a fraction of CPU speed: most of each compute chunk is
then a sleep, the cores stay free, and the schedule's structure is what gets measured.
Memory: bytes of activations held for backward (saved-tensor hooks, deduplicated by storage,
parameters excluded) at their peak on each stage, without recompute, selective and full.

    python tools/bench_pipeline.py [--pp 2,4 --microbatches 4,8,16]
"""
import argparse
import os
import time

import torch

from megahet.config import build_config
from megahet.parallel.context import RankSpec, build_parallel_context
from megahet.parallel.pipeline import forward_backward
from megahet.parallel.schedule_trace import ScheduleTracer, bubble_fraction, theoretical_bubble
from megahet.testing import run_distributed
from megahet.training.model_builder import build_model_chunks
from megahet.training.trace_export import align_to_start

VOCAB = 512
MBS = 4


def _cfg(pp, layers, vpp_layers=None, recompute=None, hidden=512, seq=256):
    over = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=4, seq_length=seq, vocab_size=VOCAB,
                mock_data=True, train_iters=1, pipeline_model_parallel_size=pp, make_vocab_size_divisible_by=8,
                recompute_granularity=recompute)
    if vpp_layers:
        over["num_layers_per_virtual_pipeline_stage"] = vpp_layers
    return build_config(overrides=over)


def _batches(m, mbs, seq):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(m):
        t = torch.randint(0, VOCAB, (mbs, seq + 1), generator=g)
        out.append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(mbs, seq)})
    return out


class SavedTensorMeter:
    """Peak bytes of tensors autograd keeps for backward (activations), deduplicated by storage."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.live, self.cur, self.peak = {}, 0, 0

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key in self.params or t.untyped_storage().nbytes() == 0:
            return t
        n, refs = self.live.get(key, (t.untyped_storage().nbytes(), 0))
        if refs == 0:
            self.cur += n
            self.peak = max(self.peak, self.cur)
        self.live[key] = (n, refs + 1)
        return _Held(t, key, self)

    def release(self, key):
        n, refs = self.live[key]
        if refs == 1:
            del self.live[key]
            self.cur -= n
        else:
            self.live[key] = (n, refs - 1)


class _Held:
    def __init__(self, t, key, meter):
        self.t, self.key, self.meter = t, key, meter

    def __del__(self):
        self.meter.release(self.key)


def _unpack(x):
    return x.t if isinstance(x, _Held) else x


def pipeline_run(pp, layers, m, schedule, vpp_layers, speed, recompute, repeats):
    specs = [RankSpec("sim", {"speed": speed}) if speed < 1 else RankSpec("cpu") for _ in range(pp)]
    ctx = build_parallel_context(pp=pp, rank_specs=specs, timeout_s=300)
    cfg = _cfg(pp, layers, vpp_layers, recompute)
    chunks = build_model_chunks(cfg, ctx, VOCAB, VOCAB)
    batches = _batches(m, MBS, cfg.model.seq_length)
    tokens = float(sum(b["loss_mask"].sum() for b in batches))
    forward_backward(chunks, batches, ctx, global_tokens=tokens, schedule=schedule)  # warm-up
    bubbles, peaks = [], []
    for _ in range(repeats):
        for c in chunks:
            c.zero_grad(set_to_none=True)
        meter = SavedTensorMeter([p for c in chunks for p in c.parameters()])
        ctx.world_group.barrier()
        tracer = ScheduleTracer(ctx.rank, start=0.0)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, _unpack):
            forward_backward(chunks, batches, ctx, global_tokens=tokens, schedule=schedule, tracer=tracer)
        bubbles.append(tracer.events)
        peaks.append(meter.peak)
    return bubbles, max(peaks)


def measure_bubble(pp, m, schedule, vpp_layers, speed, repeats=2):
    layers = pp * 2
    res = run_distributed(pipeline_run, pp, pp, layers, m, schedule, vpp_layers, speed, None, repeats,
                          timeout=600, env={"MEGAHET_TEST_THREADS": "1"})
    return min(bubble_fraction(align_to_start([res[r][0][rep] for r in range(pp)])) for rep in range(repeats))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", default="2,4")
    ap.add_argument("--microbatches", default="4,8,16")
    ap.add_argument("--sim-speed", type=float, default=0.25, help="speed of sim ranks when pp > cores")
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    print("bubble: measured vs theory (p-1)/(v*m+p-1)")
    print(f"{'pp':>3} {'schedule':>11} {'m':>4} {'backend':>10} {'measured':>9} {'theory':>7} {'diff (pp)':>9}")
    for pp in [int(x) for x in args.pp.split(",")]:
        speed = 1.0 if pp <= cores else args.sim_speed
        for sched, vpp in (("1f1b", None), ("interleaved", 1)):
            for m in [int(x) for x in args.microbatches.split(",")]:
                if sched == "interleaved" and m % pp:
                    continue
                t0 = time.time()
                measured = measure_bubble(pp, m, sched, vpp, speed)
                theory = theoretical_bubble(pp, m, 2 if vpp else 1)
                backend = "cpu" if speed == 1 else f"sim {speed}"
                print(f"{pp:>3} {sched:>11} {m:>4} {backend:>10} {measured:9.3f} {theory:7.3f} "
                      f"{100 * (measured - theory):9.1f}   ({time.time() - t0:.0f}s)", flush=True)
    print("\nactivation memory held for backward, peak per stage (MiB), pp=2, m=4, 1F1B, hidden 512, seq 256, mbs 4")
    print(f"{'recompute':>10} {'stage 0':>8} {'stage 1':>8}")
    for rec in (None, "selective", "full"):
        res = run_distributed(pipeline_run, 2, 2, 4, 4, "1f1b", None, 1.0, rec, 1, timeout=600)
        print(f"{str(rec):>10} {res[0][1] / 2**20:8.1f} {res[1][1] / 2**20:8.1f}", flush=True)


if __name__ == "__main__":
    main()
