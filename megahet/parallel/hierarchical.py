"""Reductions over a group that spans communication domains, bridging only what must cross.

A data-parallel group with members on two vendors has no library that spans it. Staging the whole
tensor of every member through the host would move size x bytes over the bridge. Instead:

  1. native reduce-scatter inside each domain: member j of domain d holds d's partial sum over its
     interval I(d, j) of the (padded) tensor;
  2. bridged exchange of shards: every member receives, from the members of the other domains whose
     intervals overlap its target interval, their partial sums there (host-staged gloo P2P);
  3. native all-gather inside each domain (all-reduce), or nothing (reduce-scatter).

Partials are combined in one fixed order of domains, so every member computes bit-identical sums.
Each domain sends its partial sums across the bridge once: bridge bytes per domain are the tensor
size x (domains - 1) for an all-reduce, not x members.

Every call (also the non-reduction ones, which use the plain bridged group) runs on one worker
thread per group, in submission order: an async reduction launched during backward proceeds while
backward continues, and calls on the group can never interleave differently on different ranks.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megahet.parallel import bridge, wait_clock
from megahet.parallel.collective_errors import named_failures
from megahet.parallel.comm import CommGroup, Work
from megahet.parallel.links import LinkCounters

_HALF = (torch.bfloat16, torch.float16)
_COMBINE = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}


def _overlap(a: Tuple[int, int], b: Tuple[int, int]) -> Tuple[int, int]:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else (0, 0)


@named_failures  # its own collectives (and their raw point-to-point waits): one-line errors naming the laggards
class HierarchicalGroup(CommGroup):
    """A CommGroup over several domains whose reductions are hierarchical (see the module docstring).

    Args:
        ranks: global ranks of the members, in group order.
        my_rank: this process's global rank.
        pg: gloo group over all members (the bridge).
        domains: communication domain of every global rank.
        sub_groups: for each domain with members here: (native group over its members or None for a
            single member, its library).
        counters: bytes sent over the bridge and natively.
        throttle: a link_throttle.SiteThrottle for simulated sites, or None.
        unreducible_dtypes: what this rank's native library cannot reduce (its backend's declaration).
    """

    def __init__(self, ranks: Sequence[int], my_rank: int, pg, domains: Sequence[str],
                 sub_groups: Dict[str, Tuple[object, str]], name: str = "", device: Optional[torch.device] = None,
                 counters: Optional[LinkCounters] = None, throttle=None,
                 unreducible_dtypes: frozenset = frozenset()):
        super().__init__(ranks, my_rank, pg=pg, bridged=True, library="gloo", name=name, device=device)
        self.domain_of = {r: domains[r] for r in self.ranks}
        self.domain_order: List[str] = list(dict.fromkeys(domains[r] for r in self.ranks))
        self.members: Dict[str, List[int]] = {d: [r for r in self.ranks if domains[r] == d] for d in self.domain_order}
        self.my_rank = my_rank
        mine = domains[my_rank]
        sub_pg, lib = sub_groups[mine]
        self.sub = CommGroup(self.members[mine], my_rank, pg=sub_pg, library=lib, name=f"{name}/{mine}",
                             device=device, unreducible_dtypes=unreducible_dtypes)
        self.counters = counters if counters is not None else LinkCounters()
        self.throttle = throttle
        self._worker: Optional[ThreadPoolExecutor] = None
        self._scratch: Dict[tuple, torch.Tensor] = {}

    def __repr__(self):
        return f"HierarchicalGroup({self.name}, ranks={self.ranks}, domains={self.domain_order})"

    # ------------------------------------------------------------------ worker
    def _submit(self, fn, async_op: bool, value=None):
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"megahet-{self.name}")
        future = self._worker.submit(fn)
        if async_op:
            return Work(finish=future.result)
        future.result()
        return value

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def _buffer(self, role, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """A reusable work buffer of `numel` elements for one role inside a call.

        Calls run one at a time on the worker thread and no buffer outlives its call, so reusing them
        is safe; it spares the page faults of a fresh multi-MB host allocation per bucket per step.
        """
        key = (role, dtype, str(device))
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)  # [numel]
            self._scratch[key] = buf
        return buf[:numel]

    # ------------------------------------------------------------------ hierarchical reductions
    def _interval(self, rank: int, length: int) -> Tuple[int, int]:
        """Interval of the flat tensor that `rank` holds after its domain's reduce-scatter."""
        group = self.members[self.domain_of[rank]]
        per = -(-length // len(group))
        j = group.index(rank)
        return min(j * per, length), min((j + 1) * per, length)

    def _domain_partial(self, flat: torch.Tensor, op: str) -> torch.Tensor:
        """Reduce-scatter inside this rank's domain: its domain's partial over its interval.

        `flat` is a work buffer this call may overwrite. The result has `per` = ceil(n / members)
        elements (the last members' intervals may be shorter than `per` or empty; the tail is padding).
        """
        n = self.sub.size
        per = -(-flat.numel() // n)
        if n == 1:
            return flat
        if self.sub.library == "gloo":
            return self._ring_reduce_scatter(flat, per, op)
        padded = flat
        if per * n != flat.numel():
            padded = torch.zeros(per * n, dtype=flat.dtype, device=flat.device)  # [per * n]
            padded[:flat.numel()] = flat
        out = torch.empty(per, dtype=flat.dtype, device=flat.device)  # [per]
        if op == "sum":
            self.sub.reduce_scatter_into(out, padded)
        else:  # max/min: reduce-scatter offers SUM only everywhere; all-reduce and keep our slice
            self.sub.all_reduce(padded, op=op)
            j = self.sub.rank
            out.copy_(padded[j * per:(j + 1) * per])
        return out

    def _ring_reduce_scatter(self, flat: torch.Tensor, per: int, op: str) -> torch.Tensor:
        """Ring reduce-scatter over a host (gloo) domain, in place in `flat`, by point-to-point.

        gloo's own reduce_scatter costs about as much as an all-reduce of the whole tensor (it reduces
        everything, then scatters); a ring moves (members - 1) / members of it once. Member j ends with
        the domain's total over chunk j, summed in ring order (the same bits on every member, since the
        all-gather then copies it). Returns chunk j, padded to `per` elements.
        """
        members = self.members[self.domain_of[self.my_rank]]
        n, j, length = len(members), self.sub.rank, flat.numel()
        right, left = members[(j + 1) % n], members[(j - 1) % n]
        chunk = lambda c: flat[min(c * per, length):min((c + 1) * per, length)]  # noqa: E731
        scratch = self._buffer("ring", per, flat.dtype, flat.device)  # [per]
        with wait_clock.waiting():
            for step in range(n - 1):
                send, recv = chunk((j - step - 1) % n), chunk((j - step - 2) % n)
                works = []
                if send.numel():
                    works.append(dist.isend(send.contiguous(), dst=right, group=self.sub.pg))
                incoming = scratch[:recv.numel()]
                if recv.numel():
                    works.append(dist.irecv(incoming, src=left, group=self.sub.pg))
                for w in works:
                    w.wait()
                if recv.numel():
                    _COMBINE[op](recv, incoming, out=recv)
        self.counters.add(right, (n - 1) * per * flat.element_size(), False)
        mine = chunk(j)
        if mine.numel() == per:
            return mine
        out = torch.zeros(per, dtype=flat.dtype, device=flat.device)  # [per]
        out[:mine.numel()] = mine
        return out

    def _combine(self, partial: torch.Tensor, length: int, target, op: str) -> torch.Tensor:
        """Exchange partial sums so this rank gets the total over `target(self.my_rank)`.

        partial: this rank's domain partial over its interval (from `_domain_partial`).
        target(rank) -> (lo, hi): the interval each member wants in full.
        """
        me = self.my_rank
        mine = self._interval(me, length)
        want = target(me)
        sends, recvs = [], []
        for s in self.ranks:
            if s == me:
                continue
            lo, hi = _overlap(mine, target(s))
            if hi > lo:
                sends.append((s, partial[lo - mine[0]:hi - mine[0]]))
            lo, hi = _overlap(self._interval(s, length), want)
            if hi > lo:
                recvs.append((s, lo, hi))
        received = self._p2p(sends, [(s, hi - lo) for s, lo, hi in recvs], partial.dtype, partial.device)
        pieces = {s: (lo, hi, t) for (s, lo, hi), t in zip(recvs, received)}
        lo, hi = _overlap(mine, want)
        if hi > lo:
            pieces[me] = (lo, hi, partial[lo - mine[0]:hi - mine[0]])
        parts = []
        for d in self.domain_order:  # one fixed order: every member computes the same bits
            have = [pieces[s] for s in self.members[d] if s in pieces]
            if len(have) == 1 and have[0][:2] == want:
                parts.append(have[0][2])  # one shard covers it: use it as it is
            else:
                part = torch.zeros(want[1] - want[0], dtype=partial.dtype, device=partial.device)  # [|want|]
                for a, b, t in have:
                    part[a - want[0]:b - want[0]] = t
                parts.append(part)
        # The first combine may write into our own partial when it is one of its two operands (the op is
        # commutative, so the bits are the same; the sends that read it have completed): the result then
        # already sits where the all-gather wants it. Otherwise a buffer of our own.
        own = pieces.get(me, (0, 0, None))[2]
        if own is not None and own.numel() == want[1] - want[0] and any(p is own for p in parts[:2]):
            out = own
        else:
            out = self._buffer("total", want[1] - want[0], partial.dtype, partial.device)
        total = _COMBINE[op](parts[0], parts[1], out=out)
        for part in parts[2:]:
            _COMBINE[op](total, part, out=total)
        return total

    def _p2p(self, sends, recv_sizes, dtype, device) -> List[torch.Tensor]:
        """Send/receive the exchange's pieces: natively to same-domain members, bridged to the others."""
        mine = self.domain_of[self.my_rank]
        ops, outs, keep = [], [], []
        native_batch = []
        for peer, t in sends:
            crosses = self.domain_of[peer] != mine
            on_host = crosses or self.sub.library == "gloo"
            wire = (t.detach().to("cpu") if on_host else t.detach()).contiguous()
            keep.append(wire)
            self.counters.add(peer, wire.numel() * wire.element_size(), crosses)
            pg = self.pg if crosses else self.sub.pg
            if on_host:
                ops.append(dist.isend(wire, dst=peer, group=pg))
            else:
                native_batch.append(dist.P2POp(dist.isend, wire, peer, pg))
        for peer, n in recv_sizes:
            crosses = self.domain_of[peer] != mine
            on_host = crosses or self.sub.library == "gloo"
            buf = self._buffer(("recv", len(outs)), n, dtype, "cpu" if on_host else device)
            outs.append(buf)
            pg = self.pg if crosses else self.sub.pg
            if on_host:
                ops.append(dist.irecv(buf, src=peer, group=pg))
            else:
                native_batch.append(dist.P2POp(dist.irecv, buf, peer, pg))
        if native_batch:
            ops.extend(dist.batch_isend_irecv(native_batch))
        receipt = self.throttle.post(self.pg, [(p, 0, 0) for p, _ in sends],
                                     [(p, n * torch.empty(0, dtype=dtype).element_size(), 0) for p, n in recv_sizes]
                                     ) if self.throttle is not None else None
        start = time.perf_counter()
        for w in ops:
            w.wait()
        if receipt is not None:  # simulated sites: wait out the link's time
            receipt.finish()
        self.counters.bridge_s += time.perf_counter() - start
        return [b if b.device == device else bridge.unstage(b, device, dtype) for b in outs]

    def _all_reduce_now(self, tensor: torch.Tensor, op: str) -> None:
        flat = tensor.detach().reshape(-1)
        in_place = flat.dtype not in _HALF and flat.is_contiguous() and flat.data_ptr() == tensor.data_ptr()
        work = flat if in_place else flat.float() if flat.dtype in _HALF else flat.clone()  # [n] (fp32 for halves)
        n = work.numel()
        partial = self._domain_partial(work, op)
        total = self._combine(partial, n, lambda r: self._interval(r, n), op)  # [|my interval|]
        per = partial.numel()
        members = self.sub.size
        if per * members == n and total.numel() == per:  # no padding: gather straight into the result
            if self.sub.library == "gloo" and members > 1:
                self._ring_all_gather(work, total, per)
            else:
                self.sub.all_gather_into(work, total)
        else:
            mine = torch.zeros(per, dtype=work.dtype, device=work.device)
            mine[:total.numel()] = total
            full = torch.empty(per * members, dtype=work.dtype, device=work.device)  # [per * domain size]
            self.sub.all_gather_into(full, mine)
            work[:] = full[:n]
        if work is not flat:
            bridge.write_back(work.view_as(tensor), tensor)

    def _ring_all_gather(self, out: torch.Tensor, chunk: torch.Tensor, per: int) -> None:
        """Ring all-gather over a host (gloo) domain by point-to-point: member j's `chunk` lands in
        out[j * per:(j + 1) * per] on every member. gloo's all-gather stages through a list of
        per-member outputs and copies; this receives straight into `out`."""
        members = self.members[self.domain_of[self.my_rank]]
        n, j = len(members), self.sub.rank
        right, left = members[(j + 1) % n], members[(j - 1) % n]
        if out[j * per:].data_ptr() != chunk.data_ptr():  # the combine may have written it in place already
            out[j * per:(j + 1) * per] = chunk
        with wait_clock.waiting():
            for step in range(n - 1):
                s, r = (j - step) % n, (j - step - 1) % n
                works = [dist.isend(out[s * per:(s + 1) * per], dst=right, group=self.sub.pg),
                         dist.irecv(out[r * per:(r + 1) * per], src=left, group=self.sub.pg)]
                for w in works:
                    w.wait()
        self.counters.add(right, (n - 1) * per * out.element_size(), False)

    def _reduce_scatter_now(self, out: torch.Tensor, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1)
        flat = flat.float() if flat.dtype in _HALF else flat.clone()  # [size * k]
        n, k = flat.numel(), out.numel()
        partial = self._domain_partial(flat, "sum")
        total = self._combine(partial, n, lambda r: (self.ranks.index(r) * k, (self.ranks.index(r) + 1) * k), "sum")
        bridge.write_back(total.view_as(out), out)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False):
        if self.size == 1:
            return Work() if async_op else tensor
        return self._submit(lambda: self._all_reduce_now(tensor, op), async_op, tensor)

    def reduce_scatter_into(self, out: torch.Tensor, tensor: torch.Tensor, async_op: bool = False):
        if tensor.numel() != out.numel() * self.size:
            raise ValueError(f"reduce_scatter over {self.name}: input has {tensor.numel()} elements, expected "
                             f"{self.size} x {out.numel()}")
        return self._submit(lambda: self._reduce_scatter_now(out, tensor), async_op, out)

    # ------------------------------------------------------------------ the rest: bridged, on the worker
    def all_gather_into(self, out: torch.Tensor, tensor: torch.Tensor, async_op: bool = False):
        def run():
            self.counters.add(-1, tensor.numel() * tensor.element_size() * (self.size - 1), True)
            CommGroup.all_gather_into(self, out, tensor)
        return self._submit(run, async_op, out)

    def all_to_all(self, tensor, in_splits, out_splits):
        result = []
        self._submit(lambda: result.append(CommGroup.all_to_all(self, tensor, in_splits, out_splits)), False)
        return result[0]

    def broadcast(self, tensor: torch.Tensor, src_global_rank: int) -> torch.Tensor:
        return self._submit(lambda: CommGroup.broadcast(self, tensor, src_global_rank), False, tensor)

    def barrier(self):
        self._submit(lambda: CommGroup.barrier(self), False)
