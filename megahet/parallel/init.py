"""Layout-invariant initialisation: every tensor's full value comes from (seed, global name).

Each parameter gets its own generator, so a stage that builds only layers 5-7, or a rank that keeps
only a slice, still sees exactly the values the single-process model has.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import torch


def param_generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    return g


def init_full_normal(shape: Sequence[int], std: float, seed: int, name: str) -> torch.Tensor:
    """The full fp32 tensor N(0, std) for parameter `name` (generated on CPU, deterministic)."""
    out = torch.empty(tuple(shape), dtype=torch.float32)
    if std == 0:
        return out.zero_()
    return out.normal_(0.0, std, generator=param_generator(seed, name))
