"""Local shards and ZeRO flat ranges map onto the right boxes of the global tensor (no processes)."""
import random
from types import SimpleNamespace

import pytest
import torch

from megahet.parallel.sharding import shard_tensor
from megahet.training.checkpoint_layout import _range_boxes, global_shape, parts


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (1, 6), (5, 1)])
def test_flat_ranges_split_into_contiguous_boxes(shape):
    n = 1
    for s in shape:
        n *= s
    full = torch.arange(n).view(shape)
    for lo in range(n):
        for hi in range(lo + 1, n + 1):
            seen = []
            for start, off, size in _range_boxes(shape, lo, hi):
                box = full[tuple(slice(o, o + s) for o, s in zip(off, size))]
                assert box.flatten().tolist() == list(range(start, start + box.numel()))  # contiguous
                seen.extend(box.flatten().tolist())
            assert seen == list(range(lo, hi))
            assert len(list(_range_boxes(shape, lo, hi))) <= 2 * len(shape) - 1


def _ctx(tp, tp_rank, ep=1, ep_rank=0):
    return SimpleNamespace(tp=tp, tp_rank=tp_rank, ep=ep, ep_rank=ep_rank)


CASES = [  # (global shape, tp_dim, chunks, ep_dim, vocab_dim, vocab, tp, ep)
    ((8, 6), 0, 1, None, None, None, 2, 1),
    ((8, 6), 1, 1, None, None, None, 2, 1),
    ((8, 6), 0, 2, None, None, None, 2, 1),  # fused [gate; up]
    ((4, 8, 6), 1, 2, 0, None, None, 2, 2),  # experts: EP on dim 0, TP on dim 1
    ((8, 6), 0, 1, 0, None, None, 2, 2),  # EP and TP on the same dim
    ((16, 4), 0, 1, None, 0, 13, 4, 1),  # vocabulary padded 13 -> 16
    ((6, 4), None, 1, None, None, None, 2, 1),  # replicated
]


@pytest.mark.parametrize("case", CASES)
def test_parts_of_shards_and_zero_ranges_match_the_global_tensor(case):
    gshape, tp_dim, chunks, ep_dim, vocab_dim, vocab, tp, ep = case
    rng = random.Random(0)
    full = torch.arange(torch.Size(gshape).numel(), dtype=torch.float32).view(gshape)
    trimmed = full if vocab_dim is None else full.narrow(vocab_dim, 0, vocab)
    for tp_rank in range(tp):
        for ep_rank in range(ep):
            local = shard_tensor(full, ep_dim, ep_rank, ep)
            local = shard_tensor(local, tp_dim, tp_rank, tp, chunks).clone()
            local.tp_dim, local.tp_chunks, local.vocab_dim = tp_dim, chunks, vocab_dim
            if ep_dim is not None:
                local.is_expert, local.ep_dim = True, ep_dim
            ctx = _ctx(tp, tp_rank, ep, ep_rank)
            assert global_shape(local, ctx, vocab) == tuple(trimmed.shape)
            ranges = [(0, local.numel())] + [sorted(rng.sample(range(local.numel() + 1), 2)) for _ in range(20)]
            for lo, hi in ranges:
                piece = local.flatten()[lo:hi]
                stored = 0
                for p in parts(local, ctx, vocab or 0, lo, hi):
                    want = trimmed[tuple(slice(o, o + s) for o, s in zip(p.global_offsets, p.sizes))]
                    assert torch.equal(p.view(piece), want)
                    stored += want.numel()
                in_vocab = (piece < trimmed.numel()).sum().item() if vocab_dim == 0 else piece.numel()
                assert stored == in_vocab
