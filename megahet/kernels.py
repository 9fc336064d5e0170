"""The kernel table: every fusable op the model calls, with plain-PyTorch reference implementations.

Model code calls ``ctx.kernels.rms_norm(...)`` and never imports a vendor module. Each backend starts
from ``Kernels.reference()`` and swaps in what it can fuse; tests compare every swapped entry with the
reference here, so the references favour clarity and fp32 accuracy over speed. All references are
differentiable with autograd.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from megahet.errors import MegahetError

KERNEL_NAMES = ("rms_norm", "layer_norm", "apply_rotary", "causal_attention", "swiglu",
                "grouped_matmul")

TokenCounts = Union[Sequence[int], torch.Tensor]


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64): the precision every reference computes in."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def reference_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """RMS-normalise the last dim in fp32 (weight applied in fp32 too), return x.dtype."""
    xf = _upcast(x)  # [..., h]
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # [..., h]
    if weight is not None:
        y = y * _upcast(weight)
    return y.to(x.dtype)


def reference_layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Layer-normalise the last dim in fp32, return x.dtype."""
    xf = _upcast(x)  # [..., h]
    centred = xf - xf.mean(dim=-1, keepdim=True)  # [..., h]
    y = centred * torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + eps)  # [..., h]
    if weight is not None:
        y = y * _upcast(weight)
    if bias is not None:
        y = y + _upcast(bias)
    return y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX / HF Llama rotation: cat(-x2, x1) over the halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)  # [..., d/2] each
    return torch.cat((-x2, x1), dim=-1)  # [..., d]


def reference_apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding x*cos + rotate_half(x)*sin, computed in fp32.

    x is [s, b, n, d]; cos/sin are [s, 1, 1, d] fp32. Returns x.dtype.
    """
    xf = _upcast(x)  # [s, b, n, d]
    y = xf * cos.to(xf.dtype) + rotate_half(xf) * sin.to(xf.dtype)  # [s, b, n, d]
    return y.to(x.dtype)


def check_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate BSND q/k/v for causal self-attention with GQA; return query heads per kv head."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise MegahetError(
            f"causal_attention needs q [b, s, nq, d] and k, v of equal shape [b, s, nkv, d]; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: pass BSND tensors")
    b, s, nq, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, s, d):
        raise MegahetError(
            f"causal_attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, "
            "sequence or head dim: pass q, k, v from the same tokens")
    nkv = k.shape[2]
    if nkv == 0 or nq % nkv != 0:
        raise MegahetError(
            f"causal_attention: {nq} query heads are not a multiple of {nkv} kv heads; choose "
            "--num-query-groups dividing --num-attention-heads")
    return nq // nkv


def reference_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Explicit causal softmax attention in fp32; GQA by repeating each kv head for its query group.

    q [b, s, nq, d], k/v [b, s, nkv, d] -> [b, s, nq, d] in q.dtype. softmax_scale defaults to d**-0.5.
    """
    group = check_attention_shapes(q, k, v)
    s, d = q.shape[1], q.shape[3]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    # Query head i reads kv head i // group (the flash-attn / SDPA enable_gqa convention).
    kf = _upcast(k).repeat_interleave(group, dim=2)  # [b, s, nq, d]
    vf = _upcast(v).repeat_interleave(group, dim=2)  # [b, s, nq, d]
    scores = torch.einsum("bqnd,bknd->bnqk", _upcast(q), kf) * scale  # [b, nq, s, s]
    future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(diagonal=1)  # [s, s]
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)  # [b, nq, s, s]
    out = torch.einsum("bnqk,bknd->bqnd", probs, vf)  # [b, s, nq, d]
    return out.to(q.dtype)


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation silu(gate) * up."""
    return F.silu(gate) * up


def expert_split_sizes(x: torch.Tensor, weight: torch.Tensor,
                       tokens_per_expert: TokenCounts) -> list[int]:
    """Validate grouped-matmul inputs and return tokens_per_expert as a list of E Python ints."""
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[1]:
        raise MegahetError(
            f"grouped_matmul needs x [T, k] and weight [E, k, n]; got x {tuple(x.shape)} and weight "
            f"{tuple(weight.shape)}: flatten tokens to rows and stack expert weights")
    if isinstance(tokens_per_expert, torch.Tensor):
        sizes = [int(c) for c in tokens_per_expert.tolist()]
    else:
        sizes = [int(c) for c in tokens_per_expert]
    if len(sizes) != weight.shape[0]:
        raise MegahetError(
            f"grouped_matmul got {len(sizes)} token counts for {weight.shape[0]} experts: pass one "
            "count per expert (zero for an expert without tokens)")
    if any(c < 0 for c in sizes) or sum(sizes) != x.shape[0]:
        raise MegahetError(
            f"grouped_matmul token counts {sizes} must be non-negative and sum to the {x.shape[0]} "
            "rows of x: count every routed row once, rows sorted by expert")
    return sizes


def reference_grouped_matmul(x: torch.Tensor, weight: torch.Tensor,
                             tokens_per_expert: TokenCounts) -> torch.Tensor:
    """Per-expert matmul by a loop: rows of x (sorted by expert) times that expert's weight.

    x [T, k], weight [E, k, n], tokens_per_expert E ints summing to T -> [T, n].
    """
    sizes = expert_split_sizes(x, weight, tokens_per_expert)
    chunks = x.split(sizes, dim=0)  # E x [t_e, k]
    outs = [chunk @ weight[e] for e, chunk in enumerate(chunks)]  # E x [t_e, n]
    return torch.cat(outs, dim=0)  # [T, n]


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Attribute table of kernels; see docs/internals.md for each signature and convention."""

    rms_norm: Callable[..., torch.Tensor]
    layer_norm: Callable[..., torch.Tensor]
    apply_rotary: Callable[..., torch.Tensor]
    causal_attention: Callable[..., torch.Tensor]
    swiglu: Callable[..., torch.Tensor]
    grouped_matmul: Callable[..., torch.Tensor]

    @classmethod
    def reference(cls) -> "Kernels":
        """The plain-PyTorch table every backend starts from and is tested against."""
        return cls(rms_norm=reference_rms_norm, layer_norm=reference_layer_norm,
                   apply_rotary=reference_apply_rotary, causal_attention=reference_causal_attention,
                   swiglu=reference_swiglu, grouped_matmul=reference_grouped_matmul)

    def replace(self, **overrides: Callable[..., torch.Tensor]) -> "Kernels":
        """Return a new table with some entries swapped; unknown names are an error."""
        unknown = sorted(set(overrides) - set(KERNEL_NAMES))
        if unknown:
            raise MegahetError(f"unknown kernel(s) {unknown}; known kernels: {', '.join(KERNEL_NAMES)}")
        bad = sorted(name for name, fn in overrides.items() if not callable(fn))
        if bad:
            raise MegahetError(f"kernel override(s) {bad} are not callable: pass functions")
        return dataclasses.replace(self, **overrides)

    def describe(self) -> dict[str, str]:
        """Name -> implementing function ('module.qualname'), for logs and diagnostics."""
        out = {}
        for name in KERNEL_NAMES:
            fn = getattr(self, name)
            module = getattr(fn, "__module__", None) or type(fn).__module__
            out[name] = f"{module}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        return out
