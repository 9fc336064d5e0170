"""CUDA backend on a real GPU: kernels (apex / flash-attn / torch._grouped_mm when present) against
the reference, plus memory, RNG and peak FLOP/s. Opt-in (marker ``gpu``), skipped without CUDA.

Only torch is imported at module level; vendor packages are imported by the backend when needed.
"""
from __future__ import annotations

import pytest
import torch

from megahet.device import get_backend
from megahet.kernels import Kernels

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]

TOLERANCE = {torch.float32: dict(atol=1e-3, rtol=1e-3),  # TF32 may be on for fp32 matmuls
             torch.bfloat16: dict(atol=4e-2, rtol=4e-2), torch.float16: dict(atol=1e-2, rtol=1e-2)}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture(scope="module")
def cuda():
    return get_backend("cuda").require_available()


def _tables(s: int, d: int):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))  # [d/2]
    angles = torch.outer(torch.arange(s).float(), inv_freq).repeat(1, 2)  # [s, d]
    return angles.cos()[:, None, None, :], angles.sin()[:, None, None, :]  # [s, 1, 1, d]


def _inputs(name: str, gen: torch.Generator):
    if name == "rms_norm":
        return [torch.randn(64, 2, 512, generator=gen), torch.rand(512, generator=gen) + 0.5, 1e-5]
    if name == "layer_norm":
        return [torch.randn(64, 2, 512, generator=gen), torch.rand(512, generator=gen) + 0.5,
                torch.randn(512, generator=gen), 1e-5]
    if name == "apply_rotary":
        cos, sin = _tables(64, 128)
        return [torch.randn(64, 2, 4, 128, generator=gen), cos, sin]
    if name in ("attention_gqa", "attention_mha"):
        nkv = 2 if name == "attention_gqa" else 8
        return [torch.randn(2, 256, 8, 64, generator=gen), torch.randn(2, 256, nkv, 64, generator=gen),
                torch.randn(2, 256, nkv, 64, generator=gen), None]
    if name == "swiglu":
        return [torch.randn(64, 2, 256, generator=gen), torch.randn(64, 2, 256, generator=gen)]
    if name == "grouped_matmul":  # expert 2 receives no tokens
        return [torch.randn(320, 256, generator=gen), torch.randn(4, 256, 128, generator=gen) / 16,
                [128, 64, 0, 128]]
    raise AssertionError(name)


KERNEL_OF = {"attention_gqa": "causal_attention", "attention_mha": "causal_attention"}
CASES = ["rms_norm", "layer_norm", "apply_rotary", "attention_gqa", "attention_mha", "swiglu",
         "grouped_matmul"]


def _run(fn, args, device, dtype):
    prepared, leaves = [], []
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.is_floating_point():
            table = arg.dim() == 4 and arg.shape[1:3] == (1, 1)  # rotary cos/sin stay fp32
            t = arg.to(device=device, dtype=torch.float32 if table else dtype)
            if not table:
                leaves.append(t.requires_grad_(True))
            prepared.append(t)
        else:
            prepared.append(arg)
    y = fn(*prepared)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    return y.detach(), [g.detach() for g in torch.autograd.grad(y, leaves, upstream)]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES)
def test_cuda_kernel_matches_reference(cuda, case, dtype):
    name = KERNEL_OF.get(case, case)
    args = _inputs(case, torch.Generator().manual_seed(0))
    device = cuda.device(0)
    y, grads = _run(getattr(cuda.kernels, name), args, device, dtype)
    y_ref, grads_ref = _run(getattr(Kernels.reference(), name), args, device, dtype)
    assert y.dtype == y_ref.dtype == dtype and y.device.type == "cuda"
    torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCE[dtype])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref.float(), **TOLERANCE[dtype])


def test_cuda_memory_rng_and_peak(cuda):
    device = cuda.device(0)
    cuda.reset_peak_memory()
    block = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
    cuda.synchronize(device)
    stats = cuda.memory_stats(device)
    assert stats["allocated_gb"] >= 0.25 and stats["peak_gb"] >= stats["allocated_gb"]
    del block
    cuda.manual_seed(5)
    first = torch.randn(8, device=device)
    state = cuda.get_rng_state()
    second = torch.randn(8, device=device)
    cuda.set_rng_state(state)
    torch.testing.assert_close(torch.randn(8, device=device), second)
    cuda.manual_seed(5)
    torch.testing.assert_close(torch.randn(8, device=device), first)
    assert cuda.peak_flops(torch.bfloat16) > 1e12
