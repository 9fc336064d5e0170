"""NVIDIA CUDA backend: nccl collectives, caching-allocator memory, apex / flash-attn kernels.

Nothing here touches CUDA or imports apex / flash_attn at import time: availability is checked in
``is_available()`` and vendor kernels are imported when the kernel table is first built.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import re
from typing import Callable, Optional

import torch

from megahet.backends.cpu import sdpa_causal_attention, torch_native_kernels, torch_rms_norm
from megahet.device import GIB, Backend, datasheet_peak_flops
from megahet.kernels import Kernels, check_attention_shapes

logger = logging.getLogger(__name__)

# Dense (no sparsity) peaks from NVIDIA's product datasheets, FLOP/s per GPU: (name as in
# torch.cuda.get_device_name, bf16/fp16 tensor core, tf32 tensor core, fp32 without tensor cores).
# Datasheets quote "with sparsity" tensor-core figures; these are half of those. fp32 matmuls count
# against the TF32 peak only while TF32 is enabled (--tf32), else against the plain fp32 peak.
_PEAK_TABLE = (
    ("H100 PCIe", 756e12, 378e12, 51e12),
    ("H100 NVL", 835e12, 418e12, 60e12),
    ("H100", 989e12, 494e12, 67e12),  # SXM5
    ("H800", 989e12, 494e12, 67e12),
    ("GH200", 989e12, 494e12, 67e12),
    ("H200", 989e12, 494e12, 67e12),
    ("H20", 148e12, 74e12, 44e12),
    ("A100", 312e12, 156e12, 19.5e12),
    ("A800", 312e12, 156e12, 19.5e12),
    ("L40S", 362e12, 183e12, 91.6e12),
    ("A10", 125e12, 62.5e12, 31.2e12),
    ("L4", 121e12, 60e12, 30.3e12),
)
_HALF = (torch.bfloat16, torch.float16)


def lookup_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> Optional[float]:
    """Datasheet peak for a GPU name ('NVIDIA H100 80GB HBM3'), or None when not in the table.

    fp32 is the TF32 tensor-core peak when `tf32` (TF32 matmuls enabled), else the plain fp32 peak.
    """
    for key, half, tf32_peak, fp32 in sorted(_PEAK_TABLE, key=lambda row: -len(row[0])):
        # Whole-word match so 'H20' never matches 'H200' and 'H100' never matches 'GH100'.
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            if dtype in _HALF:
                return half
            if dtype == torch.float32:
                return tf32_peak if tf32 else fp32
            return None
    return None


# FlashAttention-2 runs on Ampere (sm80) and newer only; older GPUs use PyTorch's SDPA.
FLASH_ATTN_MIN_CAPABILITY = (8, 0)


def _load_apex_rms_norm() -> Optional[Callable]:
    """NVIDIA apex's fused_rms_norm_affine, or None (the PyPI package named 'apex' is unrelated)."""
    try:
        if importlib.util.find_spec("fused_layer_norm_cuda") is None:  # apex built without CUDA ops
            return None
        module = importlib.import_module("apex.normalization.fused_layer_norm")
        return getattr(module, "fused_rms_norm_affine", None)
    except Exception as exc:  # a broken apex install must not stop training on torch kernels
        logger.debug("apex fused RMSNorm unavailable: %s", exc)
        return None


def _load_flash_attn() -> Optional[Callable]:
    """flash_attn.flash_attn_func (BSND, causal, native GQA), or None."""
    try:
        return getattr(importlib.import_module("flash_attn"), "flash_attn_func", None)
    except Exception as exc:
        logger.debug("flash-attn unavailable: %s", exc)
        return None


def _is_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def make_rms_norm(fused: Optional[Callable], on_device: Callable = _is_cuda) -> Callable:
    """apex fused_rms_norm_affine(input, weight, normalized_shape, eps) for same-dtype CUDA inputs.

    `on_device` says whether a tensor is on the GPU (tests pass a stand-in to check the call)."""
    if fused is None:
        return torch_rms_norm

    def apex_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
        if weight is None or weight.dtype != x.dtype or not on_device(x):
            return torch_rms_norm(x, weight, eps)
        return fused(x, weight, (x.shape[-1],), eps)  # [..., h]

    return apex_rms_norm


def make_causal_attention(flash: Optional[Callable], on_device: Callable = _is_cuda) -> Callable:
    """flash_attn_func(q, k, v, dropout_p, softmax_scale, causal) for fp16/bf16, else SDPA."""
    if flash is None:
        return sdpa_causal_attention

    def flash_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               softmax_scale: Optional[float] = None) -> torch.Tensor:
        d = q.shape[-1]
        # flash-attn 2 takes fp16/bf16 only and head dims that are multiples of 8 up to 256.
        if q.dtype not in _HALF or not on_device(q) or d % 8 != 0 or d > 256:
            return sdpa_causal_attention(q, k, v, softmax_scale)
        check_attention_shapes(q, k, v)
        return flash(q, k, v, dropout_p=0.0, softmax_scale=softmax_scale, causal=True)  # [b, s, nq, d]

    return flash_causal_attention


class CUDABackend(Backend):
    """One NVIDIA GPU per rank (cuda:local_rank) in the 'cuda' domain, talking nccl.

    Args:
        peak_tflops: peak TFLOP/s per GPU; when unset, the datasheet table, else a measured matmul.
    """

    name = "cuda"
    device_type = "cuda"
    collective_backend = "nccl"
    domain = "cuda"

    def is_available(self) -> tuple[bool, str]:
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return False, f"torch was built without CUDA (torch {torch.__version__})"
        if not torch.cuda.is_available():
            return False, "no CUDA device visible (check the driver and CUDA_VISIBLE_DEVICES)"
        return True, ""

    def device(self, local_rank: int = 0) -> torch.device:
        """cuda:local_rank, also made the current device: NCCL and the RNG calls use the current one."""
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)

    def synchronize(self, device: Optional[torch.device] = None) -> None:
        torch.cuda.synchronize(device)

    def get_rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state)

    def memory_stats(self, device: Optional[torch.device] = None) -> dict[str, float]:
        return {"allocated_gb": torch.cuda.memory_allocated(device) / GIB,
                "peak_gb": torch.cuda.max_memory_allocated(device) / GIB}

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def set_tf32(self, enabled: bool) -> None:
        """TF32 tensor cores for fp32 matmuls and convolutions (--tf32); PyTorch's default is off."""
        torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)

    def default_peak_flops(self, dtype: torch.dtype) -> float:
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32)  # what fp32 matmuls actually run at
        return datasheet_peak_flops(self, torch.cuda.get_device_name(), dtype,
                                    lambda name, dt: lookup_peak_flops(name, dt, tf32))

    def build_kernels(self) -> Kernels:
        rms_norm = make_rms_norm(_load_apex_rms_norm())
        capability = torch.cuda.get_device_capability()
        flash = _load_flash_attn() if capability >= FLASH_ATTN_MIN_CAPABILITY else None
        if flash is None and capability < FLASH_ATTN_MIN_CAPABILITY:
            logger.info("compute capability %d.%d < 8.0: attention through PyTorch SDPA, not flash-attn",
                        *capability)
        attention = make_causal_attention(flash)
        kernels = torch_native_kernels().replace(rms_norm=rms_norm, causal_attention=attention)
        logger.info("cuda kernels: %s", kernels.describe())
        return kernels
