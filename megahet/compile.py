"""--compile: torch.compile each transformer layer of a model chunk (as torchtitan does per block).

Each layer is compiled in place (`nn.Module.compile`), so parameter names, hooks and checkpoints are
unchanged. Per layer, not the whole chunk: pipeline stages and recompute units are made of layers,
and identical layers share one compiled graph. Tensor-parallel collectives inside a layer run
between graphs (dynamo breaks the graph around them), so TP/SP stay exact; activation recompute
re-runs the compiled layer. A MoE layer compiles its attention only: the token dispatcher's shapes
depend on the routing. Gradient-accumulation fusion is not traced (`grad_accumulation.fusable` is
False while compiling): compiled layers take the post-accumulate hook path for their weights.
"""
from __future__ import annotations

import logging
import shutil
from typing import Sequence

import torch
from torch import nn

log = logging.getLogger("megahet")

COMPILE_DEVICE_TYPES = ("cpu", "cuda")  # where torch.compile's default backend (inductor) generates code


def compile_supported(device: torch.device) -> tuple[bool, str]:
    """Whether --compile can work on `device`, and why not."""
    if device.type not in COMPILE_DEVICE_TYPES:
        return False, f"torch.compile's inductor backend has no code generator for {device.type} devices"
    if device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        return False, "inductor needs a C++ compiler (g++) on CPU"
    return True, ""


def compile_layers(model_chunks: Sequence[nn.Module], device: torch.device, backend: str = "inductor") -> int:
    """Compile every transformer layer of `model_chunks` in place; returns how many were compiled.

    Args:
        backend: torch.compile backend ("inductor"; tests use "aot_eager" to check tracing quickly).
    """
    ok, why = compile_supported(device)
    if not ok:
        log.warning("--compile ignored: %s", why)
        return 0
    count = 0
    for chunk in model_chunks:
        for layer in chunk.decoder.layers.values():
            if hasattr(layer.mlp, "router"):  # MoE: data-dependent dispatch stays eager
                layer.self_attention.compile(backend=backend, dynamic=False)
            else:
                layer.compile(backend=backend, dynamic=False)
            count += 1
    log.info("compiled %d transformer layers with torch.compile(backend=%s)", count, backend)
    return count
