"""ZeRO-1: fp32 masters and Adam state sharded across data parallel, params all-gathered after the step.

An fp32 param's master is its own owned elements (a view), as in the non-sharded optimizer.

Each data-parallel rank owns one contiguous shard of every gradient bucket (DataParallel with
use_distributed_optimizer=True reduce-scatters the buckets into exactly these shards). A param may
straddle shards: each rank optimises only its elements of it (a `Piece`). After AdamW, every rank
writes its updated elements into a bucket-shaped shard and one all-gather per bucket rebuilds the
full params on every replica. Norm and found-inf see each owned element once (sharded_over_dp).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from megahet.parallel.data_parallel import Bucket, GradBuffer
from megahet.training.optimizer import STATE_KEYS, MixedPrecisionOptimizer, Piece, fp32_master


@dataclass
class _OwnedShard:
    """This rank's shard [lo, hi) (buffer coordinates) of one bucket and the pieces inside it."""
    buffer: GradBuffer
    bucket: Bucket
    lo: int
    hi: int
    pieces: List[Piece]


class DistributedOptimizer(MixedPrecisionOptimizer):
    """MixedPrecisionOptimizer with masters and Adam state for this rank's shards only (same interface)."""

    sharded_over_dp = True

    def __init__(self, model_chunks, ddp, ctx, **kwargs):
        if not ddp.use_distributed_optimizer:
            raise ValueError("DistributedOptimizer needs DataParallel(use_distributed_optimizer=True) "
                             "(reduce-scatter into the shards it owns)")
        self.shards: List[_OwnedShard] = []
        super().__init__(model_chunks, ddp, ctx, **kwargs)

    def _build_pieces(self) -> List[Piece]:
        pieces: List[Piece] = []
        for buffer in self.ddp.buffers:
            for bucket in buffer.buckets:
                lo, hi = buffer.shard_range(bucket)
                owned = []
                for p in bucket.params:
                    ps, pe = buffer.param_range(p)
                    a, b = max(lo, ps), min(hi, pe)
                    if a >= b:
                        continue
                    master, aliased = fp32_master(p, a - ps, b - ps)  # [b-a] fp32 (a view of an fp32 param)
                    owned.append(Piece(p, master, buffer.data[a:b], a - ps, b - ps, aliased))
                self.shards.append(_OwnedShard(buffer, bucket, lo, hi, owned))
                pieces.extend(owned)
        return pieces

    def _gather_bucket(self, shard: _OwnedShard, values: Dict[int, torch.Tensor], dtype, rows: int = 1):
        """All-gather a bucket from every rank's shard; `values` maps id(piece.master) -> [rows, n] data."""
        n = shard.hi - shard.lo
        local = torch.zeros(rows, n, dtype=dtype, device=shard.buffer.data.device)  # [rows, shard]
        for pc in shard.pieces:
            start = shard.buffer.param_range(pc.param)[0] + pc.lo - shard.lo
            local[:, start:start + pc.hi - pc.lo] = values[id(pc.master)]
        group = shard.buffer.group
        out = torch.empty(group.size * rows * n, dtype=dtype, device=local.device)
        work = group.all_gather_into(out, local.reshape(-1), async_op=True)
        # out is [size, rows, n]: rank r's rows; the bucket for row k is out[:, k] flattened.
        return work, out, n

    @torch.no_grad()
    def _copy_masters_to_params(self) -> None:
        pending = []
        for shard in self.shards:
            dtypes = {p.dtype for p in shard.bucket.params}
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
            values = {id(pc.master): pc.master.unsqueeze(0) for pc in shard.pieces}
            pending.append((shard, *self._gather_bucket(shard, values, dtype)))
        for shard, work, out, _ in pending:  # all launched first, so the gathers overlap
            work.wait()
            for p, value in _param_views(shard, out):  # out is the whole bucket [numel] (one row per rank)
                p.copy_(value)

    def _local_state(self) -> Dict[int, Dict[str, torch.Tensor]]:
        local: Dict[int, Dict[str, torch.Tensor]] = {}
        for shard in self.shards:
            values = {id(pc.master): torch.stack([self._state_of(pc, k) for k in STATE_KEYS])
                      for pc in shard.pieces}
            work, out, n = self._gather_bucket(shard, values, torch.float32, rows=len(STATE_KEYS))
            work.wait()
            out = out.view(-1, len(STATE_KEYS), n)  # [size, keys, shard]
            for i, key in enumerate(STATE_KEYS):
                for p, value in _param_views(shard, out[:, i].reshape(-1)):  # [bucket numel]
                    local.setdefault(id(p), {})[key] = value.clone()
        return local


def _param_views(shard: _OwnedShard, bucket: torch.Tensor):
    """(param, its elements of the flat bucket-shaped `bucket`, viewed in the param's shape)."""
    for p in shard.bucket.params:
        ps, pe = shard.buffer.param_range(p)
        s = ps - shard.bucket.start
        yield p, bucket[s:s + pe - ps].view_as(p)
