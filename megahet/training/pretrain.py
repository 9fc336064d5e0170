"""The pretraining loop: build everything from the config, then step, log, evaluate, save, exit.

Reads like a table of contents on purpose; each step lives in its own module.
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megahet.config import MegahetConfig
from megahet.errors import MegahetError
from megahet.hetero.stage_stats import StageStats, StageTimer, format_stage_line
from megahet.host_allocator import configure_host_allocator
from megahet.parallel.context import ParallelContext, build_parallel_context
from megahet.parallel.pipeline import schedule_name
from megahet.parallel.schedule_trace import ScheduleTracer
from megahet.training import checkpoint as ckpt
from megahet.training.checkpoint_async import AsyncCheckpointSaver
from megahet.training.data_setup import DataSetup, build_data
from megahet.training.flops import model_flops_utilization, tflops_per_device, transformer_flops_per_token
from megahet.training.loss_scaler import build_loss_scaler
from megahet.training.lr_schedule import LRScheduler
from megahet.training.metrics import MetricsLogger
from megahet.training.rebalance import StragglerMonitor, saved_split
from megahet.training.model_builder import build_model_chunks, build_moe_tracker, params_dtype
from megahet.training.optimizer_setup import build_optimizer
from megahet.training.trace_export import export_step_trace
from megahet.training.train_step import evaluate, replica_microbatches, train_step

log = logging.getLogger("megahet")


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_in_a_row: int = 0
    skipped_total: int = 0


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO to stdout; other ranks only warnings."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True,
                        handlers=[logging.StreamHandler(sys.stdout)])


def seed_everything(ctx: ParallelContext, seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    ctx.backend.manual_seed(seed)


def total_train_iters(cfg: MegahetConfig) -> int:
    t = cfg.train
    return t.train_iters if t.train_iters is not None else math.ceil(t.train_samples / t.global_batch_size)


def build_context(cfg: MegahetConfig) -> ParallelContext:
    """The plan (from --plan, or the uniform one the flags describe) turned into this rank's context."""
    from megahet.hetero.plan_setup import build_plan
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    from megahet.parallel.link_throttle import cluster_throttles, rank_sites
    elastic = None
    if cfg.hetero.elastic:  # the groups present, re-planned when some were lost (hetero/elastic.py)
        from megahet.hetero.elastic import elastic_setup
        elastic = elastic_setup(cfg, int(os.environ.get("RANK", "0")), world_size, cfg.parallel.distributed_timeout_s)
    try:
        plan, cluster, assignment = build_plan(cfg, world_size, elastic.cluster if elastic else None)
    except MegahetError as exc:
        if elastic is None or not elastic.lost:
            raise
        raise MegahetError(f"after losing {', '.join(elastic.lost)}, the {world_size} ranks left cannot run this job: "
                           f"{exc}") from None
    ctx = build_parallel_context(rank_specs=cluster.rank_specs(), timeout_s=cfg.parallel.distributed_timeout_s,
                                 plan=plan, assignment=assignment, link_throttle=cluster_throttles(cluster),
                                 rank_sites=rank_sites(cluster), store=elastic.store if elastic else None)
    ctx.cluster = cluster
    return ctx


def pretrain(cfg: MegahetConfig) -> dict:
    """Train as the config says. Returns the last logged metrics (rank 0) for scripts and tests."""
    ctx = build_context(cfg)
    setup_logging(ctx.rank)
    seed_everything(ctx, cfg.train.seed)
    if ctx.device.type == "cpu":
        configure_host_allocator(cfg.train.host_allocator)  # before the model's memory is allocated
    log.info("megahet: %d ranks, tp=%d pp=%d dp=%d ep=%d, backend %s", ctx.world_size, ctx.tp, ctx.pp, ctx.dp,
             ctx.ep, ctx.backend.name)
    log.info("plan:\n%s", ctx.plan.table(ctx.cluster))
    t, m = cfg.train, cfg.model
    iters = total_train_iters(cfg)
    if cfg.checkpoint.save:
        ckpt.check_writable(cfg.checkpoint.save)  # fail now, not after the first hour of training
    data: DataSetup = build_data(cfg, ctx, iters)
    tracker = build_moe_tracker(cfg)
    chunks = build_model_chunks(cfg, ctx, data.vocab_size, data.padded_vocab_size, tracker)
    scaler = build_loss_scaler(t.fp16, t.loss_scale, t.initial_loss_scale)
    ddp, optimizer = build_optimizer(cfg, ctx, chunks, scaler)
    decay = t.lr_decay_iters or iters
    warmup = t.lr_warmup_iters if t.lr_warmup_fraction is None else int(t.lr_warmup_fraction * decay)
    scheduler = LRScheduler(optimizer, t.lr, t.min_lr, warmup, decay, t.lr_decay_style)
    state = TrainState()
    if cfg.checkpoint.load:
        meta = resume(cfg, ctx, chunks, optimizer, scheduler, scaler, state, data.vocab_size)
        counts = saved_split(meta, ctx.plan, t.global_batch_size) if cfg.hetero.rebalance else None
        if counts is not None:  # continue with the split --rebalance had reached, not the plan file's
            log.info("resuming with the rebalanced micro-batch counts %s per pipeline", counts)
            for pipe, n in zip(ctx.plan.pipelines, counts):
                pipe.micro_batches = n
    mine = ctx.plan.pipelines[ctx.dp_rank]  # this replica's micro-batch size and count (--rebalance edits them)
    dp_sizes = [p.samples for p in ctx.plan.pipelines]
    schedule = schedule_name(cfg, mine.micro_batches)
    stragglers = StragglerMonitor(ctx, t.global_batch_size, [p.micro_batch_size for p in ctx.plan.pipelines],
                                  threshold=cfg.hetero.straggler_threshold, rebalance=cfg.hetero.rebalance)
    flops_per_token = transformer_flops_per_token(
        m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups, m.seq_length,
        data.vocab_size, m.swiglu, m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size,
        m.moe_shared_expert_intermediate_size, m.moe_layer_freq)
    ctx.backend.set_tf32(cfg.train.tf32)  # before the peak: fp32 MFU is against TF32 only when enabled
    peak = torch.tensor([ctx.backend.peak_flops(params_dtype(cfg, ctx.backend))], dtype=torch.float64,
                        device=ctx.device)
    ctx.world_group.all_reduce(peak)  # MFU against the sum of every device's peak (mixed hardware)
    logger = MetricsLogger(ctx.rank, ctx.rank == 0, cfg.logging.metrics_file, cfg.logging.wandb_project,
                           cfg.logging.wandb_exp_name, cfg.logging.wandb_save_dir, cfg.logging.tensorboard_dir,
                           cfg.to_dict(), train_iters=iters, moe=bool(m.num_experts))
    meter = Throughput(flops_per_token, float(peak), ctx.world_size, t.global_batch_size * m.seq_length)
    saver = AsyncCheckpointSaver(ctx, data.vocab_size) if cfg.checkpoint.async_save else None
    start_time = time.time()
    last: dict = {}
    stats = StageStats(ctx)
    show_stages = ctx.pp > 1 or len(set(ctx.rank_domains)) > 1
    try:
        while state.iteration < iters:
            if saver is not None:
                saver.poll()  # publish a background save once every rank has written it
            if ctx.progress is not None:
                ctx.progress.step = state.iteration + 1  # named by other ranks' timeout errors if this one hangs
            mbs = replica_microbatches(data.train, state.consumed_samples, t.global_batch_size, dp_sizes,
                                       ctx.dp_rank, mine.micro_batch_size)
            last_step = state.iteration + 1 == iters
            tracer = ScheduleTracer(ctx.rank, start=0.0) if (cfg.logging.timing_trace and last_step) else None
            timer = StageTimer(inner=tracer)
            result = train_step(chunks, ddp, optimizer, ctx, mbs, schedule=schedule, loss_scaler=scaler,
                                moe_tracker=tracker, tracer=timer)
            stats.add(timer, result.step_time_s)
            if tracer is not None:
                export_step_trace(cfg.logging.timing_trace, tracer.events, ctx)
            state.iteration += 1
            state.consumed_samples += t.global_batch_size
            meter.add(result.step_time_s)
            straggling, next_sizes = stragglers.step(result.compute_time_s, dp_sizes, state.iteration,
                                                     warn=ctx.rank == 0)
            account_for_skips(state, result, scheduler, t.max_skipped_steps, warn=ctx.rank == 0)
            evaluated = {}
            if data.valid is not None and t.eval_interval and state.iteration % t.eval_interval == 0:
                vloss = evaluate(chunks, ctx, data.valid, eval_iters=t.eval_iters, global_batch_size=t.global_batch_size,
                                 replica_sizes=dp_sizes, micro_batch_size=mine.micro_batch_size)
                evaluated = {"valid_loss": vloss, "valid_ppl": math.exp(min(vloss, 50.0))}
            if state.iteration % cfg.logging.log_interval == 0 or state.iteration == iters or evaluated:
                values = {"iteration": state.iteration, "loss": result.loss, "lr": scheduler.lr,
                          "grad_norm": result.grad_norm, "consumed_samples": state.consumed_samples,
                          **meter.report(), "skipped_iters": state.skipped_total, "loss_scale": scaler.scale,
                          "elapsed_s": time.time() - start_time}
                mem = ctx.backend.memory_stats(ctx.device)
                values["mem_allocated_gb"], values["mem_peak_gb"] = mem.get("allocated_gb"), mem.get("peak_gb")
                if tracker is not None:
                    values.update(tracker.report(ctx))  # a collective: every rank logs the same iterations
                values.update(evaluated)
                values.update(stats.collect())  # a collective: per-stage compute / idle / bridge time
                values.update(straggling, replica_samples=list(dp_sizes))
                logger.log(state.iteration, values)
                if show_stages:
                    log.info(format_stage_line(values))
                last = values
            if next_sizes != dp_sizes:  # at the step boundary: same global batch, new split of the running plan
                dp_sizes = next_sizes
                for pipe, samples in zip(ctx.plan.pipelines, dp_sizes):
                    pipe.micro_batches = samples // pipe.micro_batch_size
                schedule = schedule_name(cfg, mine.micro_batches)
            should_exit = exit_requested(cfg, ctx, state, start_time)
            save_now = cfg.checkpoint.save and (
                (cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0)
                or state.iteration == iters or should_exit)
            if save_now:
                save(cfg, ctx, chunks, optimizer, scheduler, scaler, state, data.vocab_size, saver)
            if should_exit:
                log.info("exiting at iteration %d as requested", state.iteration)
                break
        if saver is not None:
            saver.wait()  # exit only once the last checkpoint is published
    finally:
        logger.close()
        if ctx.progress is not None:
            ctx.progress.stop()  # no heartbeat after training (the store may close with rank 0)
    return last


class Throughput:
    """Step time, tokens/s, TFLOP/s per device and MFU averaged over the steps since the last report."""

    def __init__(self, flops_per_token: float, total_peak_flops: float, devices: int, tokens_per_step: int):
        self.flops_per_token, self.peak, self.devices = flops_per_token, total_peak_flops, devices
        self.tokens_per_step = tokens_per_step
        self.time, self.steps = 0.0, 0

    def add(self, step_time_s: float) -> None:
        self.time += step_time_s
        self.steps += 1

    def report(self) -> dict:
        tokens_per_s = self.tokens_per_step * self.steps / max(self.time, 1e-9)
        out = {"tokens_per_s": tokens_per_s, "step_time_s": self.time / max(self.steps, 1),
               "tflops_per_device": tflops_per_device(self.flops_per_token, tokens_per_s, self.devices),
               "mfu": model_flops_utilization(self.flops_per_token, tokens_per_s, self.peak)}
        self.time, self.steps = 0.0, 0
        return out


def account_for_skips(state: TrainState, result, scheduler, max_skipped_steps: int, warn: bool) -> None:
    """Advance the LR schedule after a real update; count skipped (NaN/Inf) steps and stop on too many.

    Every rank takes the same decision; `warn` lets one rank report it instead of all of them.
    """
    if result.ok:
        scheduler.step()
        state.skipped_in_a_row = 0
        return
    state.skipped_in_a_row += 1
    state.skipped_total += 1
    if warn:
        log.warning("iteration %d: loss or gradients are NaN/Inf (loss %s); update skipped", state.iteration,
                    result.loss)
    if state.skipped_in_a_row >= max_skipped_steps:
        raise MegahetError(f"{state.skipped_in_a_row} consecutive steps had NaN/Inf loss or gradients "
                           f"(--max-skipped-steps {max_skipped_steps}); lower --lr or --clip-grad "
                           f"and resume from the last checkpoint")


def exit_requested(cfg: MegahetConfig, ctx: ParallelContext, state: TrainState, start_time: float) -> bool:
    """--exit-interval / --exit-duration-in-mins; rank 0's clock decides for everyone."""
    t = cfg.train
    if t.exit_interval and state.iteration % t.exit_interval == 0:
        return True
    if t.exit_duration_in_mins is None:
        return False
    flag = torch.tensor([1.0 if (time.time() - start_time) / 60.0 > t.exit_duration_in_mins else 0.0],
                        device=ctx.device)
    ctx.world_group.broadcast(flag, 0)
    return bool(flag.item())


def _meta(cfg: MegahetConfig, ctx: ParallelContext, state: TrainState, scheduler, scaler) -> dict:
    """Checkpoint metadata: the data position, schedules, config, and the plan and cluster spec the job ran
    on (--elastic restarts read them when groups are lost)."""
    return {"consumed_samples": state.consumed_samples, "skipped_total": state.skipped_total,
            "scheduler": scheduler.state_dict(), "loss_scaler": scaler.state_dict(),
            "config": cfg.to_dict(), "plan": ctx.plan.to_dict() if ctx.plan is not None else None,
            "cluster": ctx.cluster.to_dict() if ctx.cluster is not None else None}


def save(cfg, ctx, chunks, optimizer, scheduler, scaler, state: TrainState, vocab_size: int, saver=None) -> None:
    """Save now (synchronously), or hand the save to the background `saver` (--async-save)."""
    meta = _meta(cfg, ctx, state, scheduler, scaler)
    if saver is not None:
        saver.save(cfg.checkpoint.save, state.iteration, chunks, optimizer, meta=meta, keep_last=cfg.checkpoint.keep_last)
        return
    ckpt.save_checkpoint(cfg.checkpoint.save, state.iteration, chunks, optimizer, ctx, vocab_size=vocab_size,
                         meta=meta, keep_last=cfg.checkpoint.keep_last)


def resume(cfg, ctx, chunks, optimizer, scheduler, scaler, state: TrainState, vocab_size: int) -> Optional[dict]:
    """Restore model, optimizer, schedule and data position from the latest checkpoint under --load."""
    finetune = cfg.checkpoint.finetune
    if not os.path.isdir(cfg.checkpoint.load):
        raise MegahetError(f"--load {cfg.checkpoint.load} does not exist; pass a checkpoint directory written by --save")
    meta = ckpt.load_checkpoint(cfg.checkpoint.load, chunks, optimizer, ctx, vocab_size=vocab_size,
                                load_optimizer=not finetune, fallback=cfg.checkpoint.load_fallback)
    if meta is None:
        log.info("no checkpoint under %s yet; starting from scratch", cfg.checkpoint.load)
        return None
    if meta.get("model_only"):
        return meta  # weights only (e.g. converted from Hugging Face): schedule and data start fresh
    if finetune:
        optimizer.reload_model_params()  # masters were built before the weights were loaded
    else:
        state.iteration = int(meta["iteration"])
        state.consumed_samples = int(meta["consumed_samples"])
        state.skipped_total = int(meta.get("skipped_total", 0))
        scheduler.load_state_dict(meta["scheduler"])
        scaler.load_state_dict(meta["loss_scaler"])
    return meta
