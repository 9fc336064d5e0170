"""Stage boundaries between different TP degrees: activations and gradients re-sliced on the way.

Stage k's activation [s(/tp_k), b, h] is laid out one of two ways: with sequence parallelism each TP
rank holds a contiguous 1/tp_k of the sequence; without it every TP rank holds the whole tensor.
When stage k+1 has another TP degree (TP2+SP feeding TP1, TP1 feeding TP4, ...) each receiving rank
needs a different slice. `boundary_routes` says which sender rank sends which rows to which receiver
so that every receiver gets exactly the rows it needs, once (no gather-then-scatter, no duplicate
bytes); replicated rows are taken from the senders in turn to spread the load. Gradients flow back
over the same routes with the roles swapped (a stage's input gradient has its input's layout).

`StageP2P` implements the executor's P2P interface (`exchange(sends, recvs)`, one batch of a
schedule step) on top of `Links`: same-domain pieces travel natively, cross-domain ones through the
host bridge. Every piece carries a small shape header (sent ahead on the host), so shapes may change
between steps.
"""
from __future__ import annotations

from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import torch

from megahet.errors import MegahetError
from megahet.parallel.links import Links, Recv, Send

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32]
_HEADER = 10  # [ndim, dtype code, up to 8 dims]

Route = Tuple[int, int, Fraction, Fraction]  # (sender tp rank, receiver tp rank, start, end) of the sequence


def boundary_routes(src_tp: int, dst_tp: int, sequence_parallel: bool) -> List[Route]:
    """Which sender TP rank sends which fraction of the sequence to which receiver TP rank.

    Pure (no processes): sorted by receiver, then by position in the sequence.
    """
    src_chunks = src_tp if sequence_parallel else 1
    dst_chunks = dst_tp if sequence_parallel else 1
    routes: List[Route] = []
    for u in range(dst_tp):
        j = u % dst_chunks
        lo, hi = Fraction(j, dst_chunks), Fraction(j + 1, dst_chunks)
        for c in range(src_chunks):
            a, b = max(lo, Fraction(c, src_chunks)), min(hi, Fraction(c + 1, src_chunks))
            if a >= b:
                continue
            holders = [c] if src_chunks == src_tp else list(range(src_tp))
            routes.append((holders[u % len(holders)], u, a, b))
    return routes


def _rows(frac: Fraction, seq: int) -> int:
    rows = frac * seq
    if rows.denominator != 1:
        raise MegahetError(f"sequence length {seq} does not split evenly across a stage boundary; use a "
                           "--seq-length divisible by every stage's tensor_parallel")
    return int(rows)


def _header(t: torch.Tensor) -> torch.Tensor:
    if t.dim() > _HEADER - 2:
        raise ValueError(f"pipeline tensors may have at most {_HEADER - 2} dims, got {t.dim()}")
    if t.dtype not in _DTYPES:
        raise MegahetError(f"pipeline stages cannot send {t.dtype}; send one of {', '.join(map(str, _DTYPES))}")
    h = torch.zeros(_HEADER, dtype=torch.int64)
    h[0], h[1] = t.dim(), _DTYPES.index(t.dtype)
    h[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return h


def _parse(h: torch.Tensor):
    h = h.cpu()
    ndim = int(h[0])
    return tuple(int(v) for v in h[2:2 + ndim]), _DTYPES[int(h[1])]


def header_tag(tag: int) -> int:
    """Wire tag of a schedule message's shape header. Wire tags are 4 x the schedule's tag + kind:
    0 header, 1 data, 2 the link throttle's stamp of that data (link_throttle.stamp_tag)."""
    return 4 * tag


def data_tag(tag: int) -> int:
    """Wire tag of a schedule message's data (see `header_tag`)."""
    return 4 * tag + 1


class StageP2P:
    """P2P between this rank's pipeline stage and a neighbouring stage, re-slicing across TP degrees.

    Args:
        links: the per-link transport.
        stage_ranks: global ranks of every stage of this rank's pipeline (stage -> [tp ranks]).
        stage: this rank's stage; tp_rank: its rank inside the stage.
        sequence_parallel: activations are sequence-sharded inside stages with TP > 1.
        dtype: what this stage computes in; received activations and gradients are cast to it.
    """

    def __init__(self, links: Links, stage_ranks: Sequence[Sequence[int]], stage: int, tp_rank: int,
                 sequence_parallel: bool, dtype: Optional[torch.dtype] = None):
        self.links, self.stage_ranks = links, [list(r) for r in stage_ranks]
        self.stage, self.tp_rank, self.sp = stage, tp_rank, bool(sequence_parallel)
        self.dtype = dtype

    def _tp(self, stage: int) -> int:
        return len(self.stage_ranks[stage])

    def _chunks(self, stage: int) -> int:
        return self._tp(stage) if self.sp else 1

    def _pieces(self, tensor: torch.Tensor, peer: int):
        """(rows of `tensor` [s(/tp), ...], global rank) for every rank of stage `peer` that needs some."""
        seq = tensor.shape[0] * self._chunks(self.stage)  # global sequence length
        offset = Fraction(self.tp_rank % self._chunks(self.stage), self._chunks(self.stage))
        for src, dst, a, b in boundary_routes(self._tp(self.stage), self._tp(peer), self.sp):
            if src == self.tp_rank:
                yield tensor[_rows(a - offset, seq):_rows(b - offset, seq)], self.stage_ranks[peer][dst]

    def _sources(self, peer: int) -> List[int]:
        return [self.stage_ranks[peer][src]
                for src, dst, _, _ in boundary_routes(self._tp(peer), self._tp(self.stage), self.sp)
                if dst == self.tp_rank]

    def exchange(self, sends: Sequence[tuple], recvs: Sequence[tuple]) -> List[torch.Tensor]:
        """One communication batch of the schedule executor: ``sends`` [(tensor, peer stage, tag)],
        ``recvs`` [(peer stage, tag)]; returns this rank's rows of each received tensor.

        Shape headers go first over the host channel and are never waited on before the data (so a
        header costs no rendezvous round: see ``schedules.simulate_schedule``); once every incoming
        header is in, all data pieces of the batch are posted together (batched isend/irecv per
        native group) and waited on as one.
        """
        header_sends, data_sends = [], []
        for tensor, peer, tag in sends:
            for piece, rank in self._pieces(tensor, peer):
                header_sends.append(Send(_header(piece), rank, header_tag(tag)))
                data_sends.append(Send(piece, rank, data_tag(tag)))
        sources = [(self._sources(peer), tag) for peer, tag in recvs]
        header_handle, _ = self.links.post_host(header_sends, [])
        headers = self.links.exchange_host([], [Recv((_HEADER,), torch.int64, r, header_tag(tag))
                                                for srcs, tag in sources for r in srcs])
        metas = iter(_parse(h) for h in headers)
        data_recvs = [Recv(*next(metas), r, data_tag(tag)) for srcs, tag in sources for r in srcs]
        pieces = iter(self.links.exchange(data_sends, data_recvs))
        header_handle.wait()  # taken by now: every receiver read our header before our data
        out = []
        for srcs, _ in sources:
            got = [next(pieces) for _ in srcs]
            t = got[0] if len(got) == 1 else torch.cat(got, dim=0)  # [s(/tp), ...] this rank's rows
            if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
                t = t.to(self.dtype)  # the neighbour computes in another dtype (its backend lacks bf16)
            out.append(t)
        return out
