"""CommGroup: one process group plus how to talk over it (native library or host-staged bridge).

Every collective in megahet goes through a CommGroup, so the rest of the code never asks which
library or which domain it is on. A group whose members share one communication domain uses the
domain's native library (nccl, hccl, gloo) on device tensors. A group that spans domains is a
gloo group and every call stages through host memory (`megahet.parallel.bridge`): device -> host
(fp32 for reductions, since gloo and some vendors cannot reduce bf16) -> gloo -> host -> device,
written back into the caller's tensor.

Reductions use SUM; averaging is the caller's explicit division (AVG is not offered everywhere).
"""
from __future__ import annotations

import functools
import time
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megahet import strict_devices
from megahet.errors import MegahetError
from megahet.parallel import bridge
from megahet.parallel import wait_clock
from megahet.parallel.collective_errors import COLLECTIVES, named_failures

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases (>= 2.5) have the old names.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Work:
    """Handle of an asynchronous collective; `wait()` finishes it and writes results back."""

    def __init__(self, work=None, finish=None):
        self._work, self._finish = work, finish

    def wait(self):
        if self._work is not None:
            with wait_clock.waiting():
                self._work.wait()
            self._work = None
        if self._finish is not None:
            self._finish()
            self._finish = None


def _complete(work, finish, async_op: bool, value):
    """A Work for async callers; otherwise finish now (write back staged results) and return `value`."""
    if async_op:
        return Work(work, finish)
    if finish is not None:
        finish()
    return value


def _timed_waits(cls):
    """Class decorator: time spent in each collective counts as waiting (`wait_clock`), not compute."""
    for name in COLLECTIVES:
        method = getattr(cls, name, None)
        if method is None:
            continue

        def make(method):
            @functools.wraps(method)
            def call(self, *args, **kwargs):
                with wait_clock.waiting():
                    return method(self, *args, **kwargs)
            return call
        setattr(cls, name, make(method))
    return cls


@_timed_waits
@named_failures  # a hung or dead peer: one-line error naming this rank, the collective and the group
class CommGroup:
    """A set of global ranks and the process group that connects them.

    Args:
        ranks: global ranks of the members, in group order.
        my_rank: this process's global rank.
        pg: the torch process group (None when the group has one member).
        bridged: True when the members span communication domains (host-staged gloo).
        library: the collective library of `pg` (gloo, nccl or hccl).
        name: for logs and errors.
        device: this rank's compute device (where a native group's tensors live).
        unreducible_dtypes: dtypes the library cannot reduce (the backend's `unreducible_dtypes`);
            they are reduced in fp32 and written back.
    """

    def __init__(self, ranks: Sequence[int], my_rank: int, pg=None, bridged: bool = False,
                 library: str = "gloo", name: str = "", device: Optional[torch.device] = None,
                 unreducible_dtypes: frozenset = frozenset()):
        self.ranks: List[int] = list(ranks)
        self.size = len(self.ranks)
        self.rank = self.ranks.index(my_rank) if my_rank in self.ranks else -1
        self.pg, self.bridged, self.library, self.name = pg, bridged, library, name
        on_host = bridged or library == "gloo"
        # Where small metadata tensors (counts, flags) and point-to-point messages live.
        self.device = torch.device("cpu") if on_host else device
        # gloo cannot be trusted to reduce half types (pytorch issue 111131): upcast there.
        self._upcast_reductions = on_host
        self.unreducible_dtypes = frozenset() if bridged else frozenset(unreducible_dtypes)
        # Strict mode (tests): reject host-born tensors on native groups, as nccl/hccl would.
        self.strict = strict_devices.enabled() and not bridged
        if self.strict:
            strict_devices.activate()
        self.counters = None  # a LinkCounters: bytes this rank sends over the bridge (set by the context)
        # Seconds a blocking all-reduce of so many bytes also spends on a simulated slow link
        # (link_throttle.scalar_collective_delay: the world group of a job on simulated sites), or None.
        self.link_delay = None

    def _count(self, tensor: torch.Tensor, copies: int = 1) -> None:
        if self.bridged and self.counters is not None:
            self.counters.add(-1, tensor.numel() * tensor.element_size() * copies, True)

    def __repr__(self):
        kind = "bridged" if self.bridged else self.library
        return f"CommGroup({self.name}, ranks={self.ranks}, {kind})"

    def global_rank(self, group_rank: int) -> int:
        return self.ranks[group_rank]

    def check_devices(self, *tensors: torch.Tensor) -> None:
        """Raise MegahetError if a tensor is not where this group's library can read it.

        A native group's tensors must be on the group's device: nccl/hccl reject host tensors, and on
        a GPU job that error would surface only at the first step. In strict mode (tests,
        `megahet.strict_devices`) a host-born tensor is rejected even on CPU. Bridged groups stage any
        device through the host.
        """
        if self.bridged or self.device is None:
            return
        for t in tensors:
            if t.device != self.device or (self.strict and strict_devices.is_host_tensor(t)):
                where = "created on the host without device=" if t.device == self.device else f"on {t.device}"
                raise MegahetError(f"a {tuple(t.shape)} {t.dtype} tensor {where} was passed to {self.name} "
                                   f"({self.library}), whose tensors live on the group's device; create it with "
                                   f"device=ctx.device (or group.device) before the collective")

    # ------------------------------------------------------------------ reductions
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False):
        """Reduce `tensor` in place over the group. Returns the tensor (or a Work if async_op)."""
        if self.size == 1:
            return Work() if async_op else tensor
        self.check_devices(tensor)
        staged = self._stage_reduction(tensor)
        self._count(staged)
        work = dist.all_reduce(staged, op=_OPS[op], group=self.pg, async_op=async_op)
        finish = (lambda: bridge.write_back(staged, tensor)) if staged is not tensor else None
        out = _complete(work, finish, async_op, tensor)
        if self.link_delay is not None and not async_op:
            time.sleep(self.link_delay(staged.numel() * staged.element_size()))
        return out

    def _stage_reduction(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as the library reduces it: host-staged for the bridge, upcast where needed."""
        staged = bridge.stage_for_reduction(tensor, self.bridged, self._upcast_reductions)
        return staged.float() if staged.dtype in self.unreducible_dtypes else staged

    def _into(self, collective, out: torch.Tensor, staged: torch.Tensor, async_op: bool):
        """Run `collective(result, staged)` straight into `out` when dtype and device allow, else into
        a staging buffer that is written back into `out` when the work completes."""
        same = staged.dtype == out.dtype and staged.device == out.device
        result = out if same else torch.empty(out.shape, dtype=staged.dtype, device=staged.device)
        work = collective(result, staged, group=self.pg, async_op=async_op)
        finish = None if same else (lambda: bridge.write_back(result, out))
        return _complete(work, finish, async_op, out)

    def reduce_scatter_into(self, out: torch.Tensor, tensor: torch.Tensor, async_op: bool = False):
        """Sum `tensor` (dim 0 = size * len(out)) over the group into this rank's slice `out`."""
        if self.size == 1:
            out.copy_(tensor)
            return Work() if async_op else out
        if tensor.shape[0] != out.shape[0] * self.size:
            raise ValueError(f"reduce_scatter over {self.name}: input rows {tensor.shape[0]} != "
                             f"{self.size} x output rows {out.shape[0]}")
        self.check_devices(out, tensor)
        staged = self._stage_reduction(tensor.contiguous())
        self._count(staged)
        return self._into(_REDUCE_SCATTER, out, staged, async_op)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over the group and keep this rank's 1/size slice along `dim`."""
        if self.size == 1:
            return tensor
        moved = tensor.movedim(dim, 0).contiguous()
        if moved.shape[0] % self.size:
            raise ValueError(f"reduce_scatter over {self.name}: dim {dim} of size {moved.shape[0]} "
                             f"is not divisible by group size {self.size}")
        out = torch.empty((moved.shape[0] // self.size,) + tuple(moved.shape[1:]), dtype=tensor.dtype,
                          device=tensor.device)
        self.reduce_scatter_into(out, moved)
        return out.movedim(0, dim)

    # ------------------------------------------------------------------ data movement
    def all_gather_into(self, out: torch.Tensor, tensor: torch.Tensor, async_op: bool = False):
        """Concatenate every member's `tensor` along dim 0 into `out` (size * len(tensor) rows)."""
        if self.size == 1:
            out.copy_(tensor)
            return Work() if async_op else out
        self.check_devices(out, tensor)
        staged = bridge.stage(tensor.contiguous(), self.bridged)
        self._count(staged, self.size - 1)
        return self._into(_ALL_GATHER, out, staged, async_op)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every member's `tensor` along `dim` (same shape on every member)."""
        if self.size == 1:
            return tensor
        moved = tensor.movedim(dim, 0).contiguous()
        out = torch.empty((moved.shape[0] * self.size,) + tuple(moved.shape[1:]), dtype=tensor.dtype,
                          device=tensor.device)
        self.all_gather_into(out, moved)
        return out.movedim(0, dim)

    def all_gather_ints(self, values: Sequence[int]) -> List[List[int]]:
        """Gather a short list of ints from every member (e.g. token counts) as Python lists."""
        if self.size == 1:
            return [list(values)]
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        g = self.all_gather(t.unsqueeze(0), dim=0)
        return [[int(v) for v in row] for row in g.cpu()]

    def all_to_all(self, tensor: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int]) -> torch.Tensor:
        """Send `in_splits[i]` rows (dim 0) to member i; receive `out_splits[i]` rows from member i."""
        if self.size == 1:
            return tensor
        in_splits, out_splits = [int(s) for s in in_splits], [int(s) for s in out_splits]
        self.check_devices(tensor)
        staged = bridge.stage(tensor.contiguous(), self.bridged)
        self._count(staged)
        out = torch.empty((sum(out_splits),) + tuple(tensor.shape[1:]), dtype=staged.dtype, device=staged.device)
        dist.all_to_all_single(out, staged, output_split_sizes=out_splits, input_split_sizes=in_splits, group=self.pg)
        return bridge.unstage(out, tensor.device, tensor.dtype) if self.bridged else out

    def broadcast(self, tensor: torch.Tensor, src_global_rank: int) -> torch.Tensor:
        """Broadcast in place from a member, named by its global rank."""
        if self.size == 1:
            return tensor
        self.check_devices(tensor)
        staged = bridge.stage(tensor, self.bridged)
        self._count(staged)
        dist.broadcast(staged, src=src_global_rank, group=self.pg)
        if staged is not tensor:
            bridge.write_back(staged, tensor)
        return tensor

    def barrier(self):
        if self.size > 1:
            dist.barrier(group=self.pg)


def make_group(ranks: Sequence[int], my_rank: int, domains: Sequence[str], libraries: Sequence[str],
               timeout, name: str = "", device: Optional[torch.device] = None,
               unreducible_dtypes: frozenset = frozenset()) -> Optional[CommGroup]:
    """Create the process group for `ranks` (every rank must call this, in the same order).

    `domains[r]` and `libraries[r]` describe global rank r. Returns a CommGroup for members and None
    for non-members.
    """
    ranks = list(ranks)
    member_domains = {domains[r] for r in ranks}
    bridged = len(member_domains) > 1
    library = "gloo" if bridged else libraries[ranks[0]]
    pg = None
    if len(ranks) > 1:
        pg = dist.new_group(ranks=ranks, backend=library, timeout=timeout)
    if my_rank not in ranks:
        return None
    return CommGroup(ranks, my_rank, pg=pg, bridged=bridged, library=library, name=name, device=device,
                     unreducible_dtypes=unreducible_dtypes)
