"""Token dispatchers: move routed tokens to the ranks holding their experts and back (dropless or not).

Both take the tokens this expert-parallel rank routed ([N, h] with top-k `indices` [N, k] and a keep
mask from the capacity) and hand the experts rows sorted by local expert; `combine` undoes the move
and sums each token's expert outputs weighted by its routing weights. Every step is a permutation or
an adjoint collective pair, so EP=n equals EP=1 up to fp32 rounding.

- `AllToAllDispatcher` (Megatron "alltoall"): exchange the per-expert counts, then all-to-all only
  the rows each rank needs. Communication ~ tokens * topk * h.
- `AllGatherDispatcher` (Megatron "allgather"): all-gather every rank's tokens over EP, compute the
  local experts' share of all of them, reduce-scatter back. Simpler, more traffic; no count exchange
  on the critical path of the experts.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megahet.errors import MegahetError
from megahet.parallel import collectives as C
from megahet.parallel.comm import CommGroup


class Stopwatch:
    """Seconds spent in named dispatcher regions, forward and backward (when `enabled`).

    Backward time is measured between identity autograd markers at the region's output (its
    backward starts the clock) and input (stops it): approximate when other branches interleave.
    """

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.enabled, self.sync = False, sync
        self.seconds = defaultdict(float)
        self._bwd_start = {}

    def reset(self):
        self.seconds.clear()

    @contextmanager
    def region(self, name: str):
        if not self.enabled:
            yield
            return
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.seconds[name] += time.perf_counter() - t0

    def begin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return _Marker.apply(x, self, name, False) if self.enabled and x.requires_grad else x

    def end(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return _Marker.apply(x, self, name, True) if self.enabled and x.requires_grad else x


class _Marker(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, watch, name, is_end):
        ctx.watch, ctx.name, ctx.is_end = watch, name, is_end
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.watch
        w.sync()
        if ctx.is_end:
            w._bwd_start[ctx.name] = time.perf_counter()
        elif ctx.name in w._bwd_start:
            w.seconds[ctx.name + "_backward"] += time.perf_counter() - w._bwd_start.pop(ctx.name)
        return grad, None, None, None


def permute(hidden: torch.Tensor, indices: torch.Tensor, keep: Optional[torch.Tensor],
            num_experts: int) -> Tuple[torch.Tensor, List[int], torch.Tensor]:
    """Copy each kept (token, slot) assignment's row, sorted by expert (stable: token order inside).

    hidden [N, h], indices [N, k] in [0, num_experts), keep [N, k] bool or None (all kept).
    Returns rows [T, h], tokens per expert (num_experts ints) and `slots` [T]: the flat slot
    (token * k + j) of each row, which `unpermute` needs.
    """
    k = indices.shape[1]
    experts = indices.reshape(-1)  # [N*k]
    if keep is not None:
        # Dropped slots sort after every real expert and are never sent.
        experts = experts.masked_fill(~keep.reshape(-1), num_experts)
    counts = torch.bincount(experts, minlength=num_experts + 1)[:num_experts]  # [E]
    sizes = [int(c) for c in counts.tolist()]
    slots = torch.sort(experts, stable=True).indices[:sum(sizes)]  # [T]
    rows = hidden.index_select(0, torch.div(slots, k, rounding_mode="floor"))  # [T, h]
    return rows, sizes, slots


def unpermute(rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Put expert outputs back into their (token, slot) places and sum over slots with the weights.

    rows [T, h], slots [T], weights [N, k] -> [N, h]; dropped slots contribute zero.
    """
    n, k = weights.shape
    placed = rows.new_zeros((n * k, rows.shape[-1])).index_copy(0, slots, rows)  # [N*k, h]
    return (placed.view(n, k, -1) * weights.to(rows.dtype).unsqueeze(-1)).sum(dim=1)  # [N, h]


def _reorder(x: torch.Tensor, sizes: Sequence[Sequence[int]], transpose: bool) -> torch.Tensor:
    """Rows in chunks [a][b] (a outer) -> chunks in [b][a] order; `transpose` reads sizes as [b][a]."""
    outer, inner = (len(sizes[0]), len(sizes)) if transpose else (len(sizes), len(sizes[0]))
    flat = [sizes[i][o] if transpose else sizes[o][i] for o in range(outer) for i in range(inner)]
    chunks = x.split(flat, dim=0)
    return torch.cat([chunks[o * inner + i] for i in range(inner) for o in range(outer)], dim=0)


class AllToAllDispatcher:
    """Rows travel to their expert's rank by all-to-all over the expert-parallel group."""

    def __init__(self, ep_group: CommGroup, num_experts: int, stopwatch: Optional[Stopwatch] = None):
        self.ep, self.num_experts = ep_group, num_experts
        self.num_local = num_experts // ep_group.size
        self.watch = stopwatch or Stopwatch()

    def dispatch(self, hidden: torch.Tensor, indices: torch.Tensor,
                 keep: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[int]]:
        """hidden [N, h] -> rows for the local experts [T, h] sorted by local expert, and their counts."""
        hidden = self.watch.begin(hidden, "dispatch")
        with self.watch.region("dispatch"):
            rows, sizes, self.slots = permute(hidden, indices, keep, self.num_experts)  # [t, h] by global expert
            if self.ep.size == 1:
                self.recv = None
                return self.watch.end(rows, "dispatch"), sizes
            e_l, me = self.num_local, self.ep.rank
            # Every rank needs every other rank's per-expert counts to size the exchange: gather them.
            counts = self.ep.all_gather_ints(sizes)  # [ep][E]
            self.send_splits = [sum(sizes[r * e_l:(r + 1) * e_l]) for r in range(self.ep.size)]
            self.recv = [counts[s][me * e_l:(me + 1) * e_l] for s in range(self.ep.size)]  # [ep][E/ep]
            self.recv_splits = [sum(r) for r in self.recv]
            # Experts of rank r are consecutive, so the rows for rank r are one contiguous block.
            x = C.all_to_all(rows, self.ep, self.send_splits, self.recv_splits)  # [T, h] by (source, expert)
            x = _reorder(x, self.recv, transpose=False)  # [T, h] by (local expert, source)
            local = [sum(self.recv[s][j] for s in range(self.ep.size)) for j in range(e_l)]
        return self.watch.end(x, "dispatch"), local

    def combine(self, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Expert outputs [T, h] (dispatch order) -> weighted sum per token [N, h]."""
        y = self.watch.begin(y, "combine")
        with self.watch.region("combine"):
            if self.recv is not None:
                y = _reorder(y, self.recv, transpose=True)  # [T, h] by (source, local expert)
                y = C.all_to_all(y, self.ep, self.recv_splits, self.send_splits)  # [t, h] by global expert
            out = unpermute(y, self.slots, weights)  # [N, h]
        return self.watch.end(out, "combine")


class AllGatherDispatcher:
    """Every EP rank sees every EP rank's tokens and computes its own experts' share of them."""

    def __init__(self, ep_group: CommGroup, num_experts: int, stopwatch: Optional[Stopwatch] = None):
        self.ep, self.num_experts = ep_group, num_experts
        self.num_local = num_experts // ep_group.size
        self.first = ep_group.rank * self.num_local  # global id of this rank's first expert
        self.watch = stopwatch or Stopwatch()

    def _gather(self, x: torch.Tensor, grad: bool) -> torch.Tensor:
        pad = self.max_tokens - x.shape[0]
        x = F.pad(x, (0, 0, 0, pad)) if pad else x  # [N_max, ...]: micro-batches may differ per replica
        if grad:
            # Adjoint pair: all-gather forward, reduce-scatter of the partial grads backward.
            return C.gather_from_sequence_parallel_region(x, self.ep)  # [ep*N_max, ...]
        return self.ep.all_gather(x, dim=0)  # [ep*N_max, ...]

    def dispatch(self, hidden: torch.Tensor, indices: torch.Tensor,
                 keep: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[int]]:
        hidden = self.watch.begin(hidden, "dispatch")
        with self.watch.region("dispatch"):
            self.num_tokens = hidden.shape[0]
            if self.ep.size > 1:
                self.max_tokens = max(n for (n,) in self.ep.all_gather_ints([self.num_tokens]))
                keep = torch.ones_like(indices, dtype=torch.bool) if keep is None else keep
                hidden = self._gather(hidden, True)  # [ep*N_max, h]
                indices = self._gather(indices, False)  # [ep*N_max, k]
                keep = self._gather(keep.to(torch.uint8), False).bool()  # padding rows are never kept
            local = indices - self.first  # [M, k]
            mine = (local >= 0) & (local < self.num_local)
            keep = mine if keep is None else keep & mine
            rows, sizes, self.slots = permute(hidden, local.clamp(0, self.num_local - 1), keep, self.num_local)
        return self.watch.end(rows, "dispatch"), sizes

    def combine(self, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        y = self.watch.begin(y, "combine")
        with self.watch.region("combine"):
            if self.ep.size > 1:
                weights = self._gather(weights, True)  # [ep*N_max, k]
            out = unpermute(y, self.slots, weights)  # [M, h], only the local experts' share
            if self.ep.size > 1:
                # Each rank holds part of every token's sum: reduce-scatter gives each its own tokens.
                out = C.reduce_scatter_to_sequence_parallel_region(out, self.ep)[:self.num_tokens]  # [N, h]
        return self.watch.end(out, "combine")


def build_dispatcher(kind: str, ep_group: CommGroup, num_experts: int, stopwatch: Optional[Stopwatch] = None):
    """'alltoall' or 'allgather' (--moe-token-dispatcher-type)."""
    if kind == "alltoall":
        return AllToAllDispatcher(ep_group, num_experts, stopwatch)
    if kind == "allgather":
        return AllGatherDispatcher(ep_group, num_experts, stopwatch)
    raise MegahetError(f"--moe-token-dispatcher-type must be alltoall or allgather, got {kind!r}")
