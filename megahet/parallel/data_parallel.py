"""Data parallelism: contiguous fp32 gradient buffers reduced in buckets, optionally during backward.

Every trainable parameter gets `param.main_grad`, an fp32 view into a flat buffer of its model chunk.
Linear and embedding layers write their weight gradients into it directly (gradient-accumulation
fusion, `grad_accumulation.py`); for the other params a post-accumulate-grad hook adds each
micro-batch's `param.grad` (any dtype) into it and frees `param.grad`, so gradients accumulate in
fp32 whatever the parameter dtype. A step starts with `start_grad_accumulation`, which zeroes
nothing: each param's first write of the step overwrites, and `finish_grad_sync` zeroes only the
params that received no gradient at all.

Buckets are SUMMED over the data-parallel group (all-reduce; or reduce-scatter into this rank's shard
for the distributed optimizer), never averaged: every micro-batch's loss is already divided by the
global token count (docs/internals.md, "Loss and batches"), so the sum is the exact token-weighted mean
even when replicas get different numbers of samples.

Layout (what the distributed optimizer reads through `DataParallel.buffers`):
    buffer.data   [numel] fp32: buckets back to back; each bucket padded to a multiple of the group size
    bucket        [start, end) of the buffer; params in reverse registration order (backward order)
    shard         rank r owns [start + r*L/size, start + (r+1)*L/size) of each bucket, L = end - start
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from megahet.errors import MegahetError
from megahet.parallel.comm import CommGroup, Work
from megahet.parallel.grad_accumulation import MainGradState, add_to_main_grad
from megahet.parallel.grad_sync import (allreduce_embedding_grads, allreduce_sequence_parallel_grads,
                                       embedding_resliced, embedding_shards_misaligned,
                                       exchange_resliced_embedding_grads)

log = logging.getLogger("megahet")


class Bucket:
    """A contiguous slice [start, end) of a GradBuffer, reduced by one collective."""

    def __init__(self, index: int, params: List[nn.Parameter], start: int, end: int):
        self.index, self.params, self.start, self.end = index, params, start, end
        self.ready: set = set()  # ids of params accumulated in the current (last) micro-batch
        self.work: Optional[Work] = None
        self.launched = False
        self.shard_out: Optional[torch.Tensor] = None  # reduce-scatter result before it is copied back

    @property
    def numel(self) -> int:
        return self.end - self.start

    def all_ready(self) -> bool:
        return len(self.ready) == len(self.params)

    def reset(self) -> None:
        self.ready.clear()
        self.work, self.launched, self.shard_out = None, False, None


class GradBuffer:
    """One flat fp32 gradient buffer of one model chunk, reduced over one group.

    Args:
        chunk_index: the model chunk (virtual pipeline stage) whose params it holds.
        group: the data-parallel (or expert-data-parallel) group its buckets are summed over.
        params: in bucket order (reverse registration order: the order backward produces grads).
        bucket_size: close a bucket once it holds at least this many elements.
        isolate_shared_embedding: give tied-embedding params a bucket of their own, so that the
            first and the last stage shard them identically (their grads are summed across the
            embedding group after the data-parallel reduce-scatter).
    """

    def __init__(self, chunk_index: int, group: CommGroup, params: Sequence[nn.Parameter], bucket_size: int,
                 isolate_shared_embedding: bool, device):
        self.chunk_index, self.group = chunk_index, group
        self.params = list(params)
        self.ranges: Dict[int, Tuple[int, int]] = {}  # id(param) -> [start, end) in data
        self.buckets: List[Bucket] = []
        size = group.size
        pad = lambda n: -(-n // size) * size  # noqa: E731
        offset, current, start = 0, [], 0

        def close():
            nonlocal offset, current, start
            if current:
                end = start + pad(offset - start)
                self.buckets.append(Bucket(len(self.buckets), current, start, end))
                offset = start = end
                current = []

        for p in self.params:
            shared = isolate_shared_embedding and getattr(p, "shared_embedding", False)
            if shared:
                close()
            self.ranges[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
            current.append(p)
            if shared or offset - start >= bucket_size:
                close()
        close()
        self.numel = offset
        self.data = torch.zeros(self.numel, dtype=torch.float32, device=device)  # [numel] fp32
        self.bucket_of: Dict[int, Bucket] = {id(p): b for b in self.buckets for p in b.params}
        self.next_launch = 0  # buckets launch in index order, so every replica issues the same sequence
        for p in self.params:
            s, e = self.ranges[id(p)]
            p.main_grad = self.data[s:e].view_as(p)

    def param_range(self, param: torch.Tensor) -> Tuple[int, int]:
        """[start, end) of `param`'s gradient in `data`."""
        return self.ranges[id(param)]

    def shard_range(self, bucket: Bucket) -> Tuple[int, int]:
        """[start, end) in `data` of the part of `bucket` this rank owns (distributed optimizer)."""
        per = bucket.numel // self.group.size
        lo = bucket.start + self.group.rank * per
        return lo, lo + per

    def launch(self, bucket: Bucket, scatter: bool) -> None:
        """Start the bucket's SUM collective asynchronously (all-reduce, or reduce-scatter to our shard)."""
        bucket.launched = True
        if self.group.size == 1:
            return
        view = self.data[bucket.start:bucket.end]  # [L] contiguous
        if scatter:
            # A separate output: gloo and the bridge do not promise an in-place reduce-scatter.
            bucket.shard_out = torch.empty(bucket.numel // self.group.size, dtype=torch.float32, device=view.device)
            bucket.work = self.group.reduce_scatter_into(bucket.shard_out, view, async_op=True)
        else:
            bucket.work = self.group.all_reduce(view, async_op=True)

    def launch_ready(self, scatter: bool, everything: bool = False) -> None:
        """Launch buckets in index order while they are complete (all remaining ones with `everything`)."""
        while self.next_launch < len(self.buckets) and (everything or self.buckets[self.next_launch].all_ready()):
            self.launch(self.buckets[self.next_launch], scatter)
            self.next_launch += 1

    def finish(self, scatter: bool) -> None:
        """Launch what backward did not, wait for every bucket, write reduce-scatter shards back."""
        self.launch_ready(scatter, everything=True)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            if bucket.shard_out is not None:
                lo, hi = self.shard_range(bucket)
                self.data[lo:hi].copy_(bucket.shard_out)
        self.reset()

    def reset(self) -> None:
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()  # never leave a collective writing into memory we are about to reuse
            bucket.reset()
        self.next_launch = 0


class DataParallel:
    """Gradient buffers, accumulation hooks and bucketed SUM reductions for this rank's model chunks.

    Args:
        model_chunks: this rank's model chunks (several with a virtual pipeline); each gets its own
            buffers because virtual stages finish backward at different times.
        ctx: the parallel context; dense params reduce over `ctx.dp_group`, params flagged
            `is_expert` over `ctx.expert_dp_group` (a separate buffer when the groups differ).
        bucket_size: elements per bucket (--ddp-bucket-size).
        overlap_grad_reduce: launch a bucket's reduction as soon as backward has produced all of its
            grads (only while grad sync is enabled: the schedule enables it for the last micro-batch).
        use_distributed_optimizer: reduce-scatter (each rank keeps its shard) instead of all-reduce.
        gradient_accumulation_fusion: let layers write weight gradients into main_grad directly.
    """

    def __init__(self, model_chunks: Sequence[nn.Module], ctx, *, bucket_size: int = 4_000_000,
                 overlap_grad_reduce: bool = False, use_distributed_optimizer: bool = False,
                 gradient_accumulation_fusion: bool = True):
        if int(bucket_size) < 1:
            raise MegahetError(f"--ddp-bucket-size {bucket_size} must be >= 1 (elements per gradient bucket)")
        self.ctx = ctx
        self.model_chunks = list(model_chunks)
        self.overlap_grad_reduce = bool(overlap_grad_reduce)
        self.use_distributed_optimizer = bool(use_distributed_optimizer)
        self._sync_enabled = [True] * len(self.model_chunks)
        # A tied embedding re-sliced between stages of different TP degrees, or whose first- and last-stage
        # copies get different distributed-optimizer shards, is summed before the data-parallel reduction
        # (the copies' valid parts would not line up after it), so its bucket may not start early.
        tied = any(getattr(p, "shared_embedding", False) for c in self.model_chunks for p in c.parameters())
        self._resliced_embedding = tied and embedding_resliced(ctx)
        self._embedding_first = tied and (self._resliced_embedding or (
            self.use_distributed_optimizer and embedding_shards_misaligned(ctx)))
        if self._embedding_first:
            self.overlap_grad_reduce = False
        # With ep == 1 the expert-data-parallel group is the data-parallel group: one buffer, one order.
        split_experts = list(ctx.expert_dp_group.ranks) != list(ctx.dp_group.ranks)
        self.buffers: List[GradBuffer] = []
        seen: set = set()
        for ci, chunk in enumerate(self.model_chunks):
            params = [p for p in chunk.parameters() if p.requires_grad]
            for p in params:
                if id(p) in seen:
                    raise ValueError(f"parameter {getattr(p, 'global_name', '?')} appears in two model chunks")
                seen.add(id(p))
            is_expert = [split_experts and getattr(p, "is_expert", False) for p in params]
            expert = [p for p, e in zip(params, is_expert) if e]
            dense = [p for p, e in zip(params, is_expert) if not e]
            for group, plist in ((ctx.dp_group, dense), (ctx.expert_dp_group, expert)):
                if plist:
                    self.buffers.append(GradBuffer(ci, group, list(reversed(plist)), int(bucket_size),
                                                   self.use_distributed_optimizer, ctx.device))
        self._buffer_of: Dict[int, GradBuffer] = {id(p): b for b in self.buffers for p in b.params}
        self.params: List[nn.Parameter] = [p for b in self.buffers for p in b.params]
        for p in self.params:
            p.main_grad_state = MainGradState(fuse=bool(gradient_accumulation_fusion))
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        log.debug("data parallel: %d buffers, %d buckets, %d grad elements", len(self.buffers),
                  sum(len(b.buckets) for b in self.buffers), sum(b.numel for b in self.buffers))

    def _on_grad(self, param: torch.Tensor) -> None:
        """After autograd accumulated param.grad: move it into the fp32 buffer, maybe launch the bucket."""
        buffer = self._buffer_of[id(param)]
        bucket = buffer.bucket_of[id(param)]
        if param.grad is not None:
            if bucket.launched:
                raise RuntimeError(f"gradient of {getattr(param, 'global_name', '?')} arrived after its bucket "
                                   f"was reduced: disable grad sync for all but the last micro-batch")
            state = param.main_grad_state
            if state.dummy:  # the layer's backward already wrote main_grad; .grad is a placeholder
                state.dummy = False
            else:
                add_to_main_grad(param, param.grad)  # fp32 (+)= grad (any dtype)
            param.grad = None
        if self.overlap_grad_reduce and self._sync_enabled[buffer.chunk_index]:
            bucket.ready.add(id(param))
            buffer.launch_ready(self.use_distributed_optimizer)

    def enable_grad_sync(self, chunk_index: Optional[int], enabled: bool) -> None:
        """Allow (or hold back) overlapped reductions of one chunk (None: all chunks).

        Before the last micro-batch's backward hooks only accumulate; the schedule enables sync just
        before it so full buckets start reducing while the rest of backward runs.
        """
        chunks = range(len(self.model_chunks)) if chunk_index is None else [chunk_index]
        for c in chunks:
            self._sync_enabled[c] = bool(enabled)

    def zero_grad(self) -> None:
        """Zero every main_grad (the buffers) and drop any param.grad; forget bucket progress."""
        for buffer in self.buffers:
            buffer.reset()
            buffer.data.zero_()
        for p in self.params:
            p.grad = None
            p.main_grad_state.overwrite = p.main_grad_state.dummy = False

    def start_grad_accumulation(self) -> None:
        """Begin a step's gradients without zeroing: each param's first write overwrites its main_grad.

        What zero_grad gives, without a pass over the buffers (Megatron zeroes them every step).
        """
        for buffer in self.buffers:
            buffer.reset()
        for p in self.params:
            p.grad = None
            p.main_grad_state.overwrite, p.main_grad_state.dummy = True, False

    def _zero_unwritten(self) -> None:
        """Params that got no gradient this step (e.g. an unused layer) hold last step's: zero them."""
        for p in self.params:
            if p.main_grad_state.overwrite:
                p.main_grad.zero_()
                p.main_grad_state.overwrite = False

    def finish_grad_sync(self) -> None:
        """Complete the step's gradient reductions; afterwards main_grad holds the summed gradient.

        With the distributed optimizer only this rank's shard of each bucket is reduced (the rest of
        the buffer keeps local partial sums). Then, as in Megatron, sequence-parallel params are summed
        over TP and the tied embedding over the embedding group, on the main grads.
        """
        self._zero_unwritten()
        if self._resliced_embedding:
            exchange_resliced_embedding_grads(self.params, self.ctx)
        elif self._embedding_first:
            allreduce_embedding_grads(self.params, self.ctx.embedding_group)
        for buffer in self.buffers:
            buffer.finish(self.use_distributed_optimizer)
        allreduce_sequence_parallel_grads(self.params, self.ctx.tp_group)
        if not self._embedding_first and any(getattr(p, "shared_embedding", False) for p in self.params):
            allreduce_embedding_grads(self.params, self.ctx.embedding_group)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
