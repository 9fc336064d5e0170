"""CPU backend: gloo collectives, host memory, and PyTorch's own fused kernels.

The kernels here use only torch operators, so the CUDA and NPU backends reuse them as their fallbacks
when a vendor kernel is missing or does not accept the inputs.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from megahet.device import Backend
from megahet.kernels import (Kernels, TokenCounts, check_attention_shapes, expert_split_sizes,
                             reference_apply_rotary, reference_grouped_matmul, reference_rms_norm)

logger = logging.getLogger(__name__)

# (device type, dtype) -> whether torch._grouped_mm ran and matched the loop on a tiny problem.
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def torch_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """F.rms_norm (fused, computes in fp32 for half types); mixed dtypes take the reference path."""
    if weight is not None and weight.dtype != x.dtype:
        # torch cannot fuse mixed dtypes (and warns); the reference applies an fp32 weight exactly.
        return reference_rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def torch_layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     eps: float) -> torch.Tensor:
    """F.layer_norm over the last dim (accumulates in fp32 for half types)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def sdpa_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          softmax_scale: Optional[float] = None) -> torch.Tensor:
    """F.scaled_dot_product_attention with is_causal; BSND in and out, GQA via enable_gqa."""
    group = check_attention_shapes(q, k, v)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [b, n, s, d]
        is_causal=True, scale=softmax_scale, enable_gqa=group > 1)  # [b, nq, s, d]
    # A view, not a copy: SDPA lays its output out like q, so for the model's [s, b, n, d] activations
    # the layer's transpose back and reshape are views too.
    return out.transpose(1, 2)  # [b, s, nq, d]


class _RotaryHalves(torch.autograd.Function):
    """x*cos + rotate_half(x)*sin written as one product and two in-place multiply-adds per half.

    The autograd graph of the plain formula allocates five tensors forward (neg, cat, two products,
    the sum) and as many backward; this makes one forward and one backward, and saves no activation.
    Computes in fp32 at least, returns x.dtype, as the reference.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.in_dtype = x.dtype
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # [s, b, n, d]
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]  # [s, b, n, d/2] each
        out = xf * cos.to(xf.dtype)  # [s, b, n, d]
        out[..., :half].addcmul_(x2, sin[..., :half].to(xf.dtype), value=-1.0)  # y1 = x1 c1 - x2 s1
        out[..., half:].addcmul_(x1, sin[..., half:].to(xf.dtype))  # y2 = x2 c2 + x1 s2
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        gf = grad.to(torch.promote_types(grad.dtype, torch.float32))  # [s, b, n, d]
        half = gf.shape[-1] // 2
        g1, g2 = gf[..., :half], gf[..., half:]
        dx = gf * cos.to(gf.dtype)  # [s, b, n, d]
        dx[..., :half].addcmul_(g2, sin[..., half:].to(gf.dtype))  # dx1 = g1 c1 + g2 s2
        dx[..., half:].addcmul_(g1, sin[..., :half].to(gf.dtype), value=-1.0)  # dx2 = g2 c2 - g1 s1
        return dx.to(ctx.in_dtype), None, None


def fused_apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (see megahet.kernels.reference_apply_rotary) with fewer passes over x."""
    if x.shape[-1] % 2:
        return reference_apply_rotary(x, cos, sin)  # its error message for odd head dims
    return _RotaryHalves.apply(x, cos, sin)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous copy whose rows start on 16-byte boundaries, as torch._grouped_mm requires."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _loop_matches_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Run torch._grouped_mm forward and backward on a tiny problem and compare with the loop."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 16, generator=gen).to(device=device, dtype=dtype).requires_grad_()  # [T, k]
    w = torch.randn(3, 16, 8, generator=gen).to(device=device, dtype=dtype).requires_grad_()  # [E, k, n]
    sizes = [5, 0, 7]  # an expert without tokens is part of the probe
    y = _grouped_mm_call(x, w, sizes)  # [T, n]
    y.sum().backward()  # sum() gives an expanded (stride-0) grad, the case torch mishandles
    ref = reference_grouped_matmul(x.detach().float(), w.detach().float(), sizes)  # [T, n]
    return bool(torch.allclose(y.detach().float(), ref, atol=0.1, rtol=0.05)
                and w.grad is not None and float(w.grad[1].abs().max()) == 0.0)


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm works for dtype on this device type (probed once per process)."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_WORKS:
        ok = False
        if hasattr(torch, "_grouped_mm"):
            try:
                ok = _loop_matches_grouped_mm(device, dtype)
            except (RuntimeError, NotImplementedError, TypeError) as exc:
                logger.debug("torch._grouped_mm unusable for %s on %s: %s", dtype, device.type, exc)
        _GROUPED_MM_WORKS[key] = ok
        logger.debug("torch._grouped_mm for %s on %s: %s", dtype, device.type,
                     "used" if ok else "loop fallback")
    return _GROUPED_MM_WORKS[key]


def _grouped_mm_call(x: torch.Tensor, weight: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    # offs are int32 cumulative row ends, one per expert (the torch._grouped_mm convention).
    ends, total = [], 0
    for count in sizes:
        total += count
        ends.append(total)
    offs = torch.tensor(ends, dtype=torch.int32, device=x.device)  # [E]
    y = torch._grouped_mm(_aligned(x), _aligned(weight), offs=offs)  # [T, n]
    if y.requires_grad:
        # torch._grouped_mm's backward rejects stride-0 (expanded) grads such as those of y.sum().
        y.register_hook(lambda grad: grad.contiguous())
    return y


def torch_grouped_matmul(x: torch.Tensor, weight: torch.Tensor,
                         tokens_per_expert: TokenCounts) -> torch.Tensor:
    """torch._grouped_mm where it works for the dtype and alignment, else the per-expert loop.

    x [T, k] rows sorted by expert, weight [E, k, n] -> [T, n].
    """
    sizes = expert_split_sizes(x, weight, tokens_per_expert)
    row_bytes = x.element_size()
    usable = (x.dtype == weight.dtype and x.shape[0] > 0
              and (weight.shape[1] * row_bytes) % 16 == 0 and (weight.shape[2] * row_bytes) % 16 == 0
              and grouped_mm_works(x.device, x.dtype))
    if not usable:
        return reference_grouped_matmul(x, weight, sizes)
    return _grouped_mm_call(x, weight, sizes)


def torch_native_kernels() -> Kernels:
    """Reference table with the entries PyTorch itself fuses on every device type."""
    return Kernels.reference().replace(rms_norm=torch_rms_norm, layer_norm=torch_layer_norm,
                                       apply_rotary=fused_apply_rotary, causal_attention=sdpa_causal_attention,
                                       grouped_matmul=torch_grouped_matmul)


class CPUBackend(Backend):
    """Host CPU in the 'cpu' communication domain, talking gloo.

    Args:
        peak_tflops: peak TFLOP/s per process; when unset a matmul is measured once per dtype.
    """

    name = "cpu"
    device_type = "cpu"
    collective_backend = "gloo"
    domain = "cpu"

    def device(self, local_rank: int = 0) -> torch.device:
        """Always plain 'cpu': tensors report torch.device('cpu'), never 'cpu:N'."""
        return torch.device("cpu")

    def build_kernels(self) -> Kernels:
        return torch_native_kernels()
