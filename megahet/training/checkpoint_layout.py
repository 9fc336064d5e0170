"""Where a rank's tensors sit inside the global (unsharded) tensors: boxes in global coordinates.

A rank holds a TP/EP shard of each parameter (its *local* tensor) and, under ZeRO, only a flat range
[lo, hi) of that local tensor. Both are described here as `Part`s: a view of the rank's flat data and
the global box (offsets, sizes) it holds. Checkpoints store and load Parts only, so no rank ever
builds a full tensor, and any other layout can read the boxes it needs.

Local -> global, per dim (see megahet.parallel.sharding): EP splits `ep_dim` of expert params into
`ep` blocks; TP then splits each of the `tp_chunks` blocks of `tp_dim` across `tp` ranks, so local
block k of tp_dim sits at k * (global/chunks) + tp_rank * (local/chunks). The vocabulary dim is
clipped to the real vocabulary: padding rows are never stored (and load as zeros).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Iterator, List, Sequence, Tuple

import torch

from megahet.parallel.sharding import full_shape
from megahet.training.grad_norm import counted_here


@dataclass
class Part:
    """Elements of a rank's flat data that form one box of the global tensor.

    flat[start : start + prod(box)].view(box) narrowed by (narrow_offsets, sizes) is the global box
    `global_offsets` + `sizes`.
    """
    start: int
    box: Tuple[int, ...]
    narrow_offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    global_offsets: Tuple[int, ...]

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        n = 1
        for s in self.box:
            n *= s
        out = flat[self.start:self.start + n].view(self.box)
        for d, (o, s) in enumerate(zip(self.narrow_offsets, self.sizes)):
            out = out.narrow(d, o, s)
        return out  # [*sizes], a view of flat


def global_shape(param: torch.Tensor, ctx, vocab_size: int) -> Tuple[int, ...]:
    """The shape a parameter has in checkpoints: unsharded, vocabulary padding removed."""
    shape = list(full_shape(param, ctx.tp, ctx.ep))
    dim = getattr(param, "vocab_dim", None)
    if dim is not None:
        shape[dim] = vocab_size
    return tuple(shape)


def _segments(param: torch.Tensor, ctx, vocab_size: int) -> List[List[Tuple[int, int, int]]]:
    """Per dim, (local_start, global_start, length) runs mapping the local tensor into the global one."""
    local = list(param.shape)
    tp_dim = getattr(param, "tp_dim", None) if ctx.tp > 1 else None
    chunks = getattr(param, "tp_chunks", 1)
    ep_dim = getattr(param, "ep_dim", None) if (getattr(param, "is_expert", False) and ctx.ep > 1) else None
    vocab_dim = getattr(param, "vocab_dim", None)
    out = []
    for d, n in enumerate(local):
        runs = [(0, 0, n)]
        if d == tp_dim:
            block = n // chunks  # local elements per chunk; the EP-local dim is n * tp
            runs = [(k * block, k * block * ctx.tp + ctx.tp_rank * block, block) for k in range(chunks)]
        if d == ep_dim:
            runs = [(lo, g + ctx.ep_rank * n * (ctx.tp if d == tp_dim else 1), ln) for lo, g, ln in runs]
        if d == vocab_dim:
            runs = [(lo, g, max(0, min(ln, vocab_size - g))) for lo, g, ln in runs]
        out.append([r for r in runs if r[2] > 0])
    return out


def _range_boxes(shape: Sequence[int], lo: int, hi: int) -> Iterator[Tuple[int, Tuple[int, ...], Tuple[int, ...]]]:
    """Split the flat range [lo, hi) of a row-major `shape` into boxes contiguous in memory.

    Yields (flat start, box offsets, box sizes); at most 2 * len(shape) - 1 boxes.
    """
    if lo >= hi:
        return
    if not shape:
        yield lo, (), ()
        return
    inner = 1
    for s in shape[1:]:
        inner *= s
    rest = tuple(shape[1:])
    first, last = lo // inner, (hi - 1) // inner  # rows touched
    if first == last and not (lo % inner == 0 and hi - lo == inner):
        for start, off, size in _range_boxes(rest, lo - first * inner, hi - first * inner):
            yield first * inner + start, (first,) + off, (1,) + size
        return
    if lo % inner:  # partial first row
        yield from _range_boxes(shape, lo, (first + 1) * inner)
        first += 1
    end = hi // inner  # full rows [first, end)
    if end > first:
        yield first * inner, (first,) + (0,) * len(rest), (end - first,) + rest
    if hi % inner and end >= first:
        yield from _range_boxes(shape, max(end * inner, first * inner), hi)


def parts(param: torch.Tensor, ctx, vocab_size: int, lo: int = 0, hi: int = -1) -> List[Part]:
    """The global boxes of elements [lo, hi) of this rank's flattened local `param` (default: all).

    Flat starts are relative to `lo`, i.e. index the flat piece [hi - lo] (a ZeRO shard's own tensor).
    """
    hi = param.numel() if hi < 0 else hi
    segs = _segments(param, ctx, vocab_size)
    out = []
    for start, off, size in _range_boxes(tuple(param.shape), lo, hi):
        for runs in product(*segs):
            a = [max(o, r[0]) for o, r in zip(off, runs)]
            b = [min(o + s, r[0] + r[2]) for o, s, r in zip(off, size, runs)]
            if any(x >= y for x, y in zip(a, b)):
                continue
            out.append(Part(start=start - lo, box=tuple(size),
                            narrow_offsets=tuple(x - o for x, o in zip(a, off)),
                            sizes=tuple(y - x for x, y in zip(a, b)),
                            global_offsets=tuple(r[1] + x - r[0] for x, r in zip(a, runs))))
    return out


def writes_weights(param: torch.Tensor, ctx) -> bool:
    """Whether this rank stores `param`'s weights: one copy of every element in the job (replicas
    over DP, TP-replicated params and the last stage's tied embedding are skipped)."""
    return counted_here(param, ctx, sharded_over_dp=False)


def writes_optimizer_state(param: torch.Tensor, ctx, sharded_over_dp: bool) -> bool:
    """Whether this rank stores its optimizer pieces of `param` (each ZeRO rank owns distinct ones)."""
    return counted_here(param, ctx, sharded_over_dp=sharded_over_dp)
