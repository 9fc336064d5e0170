"""Huawei Ascend NPU backend: hccl collectives and torch_npu's fused kernels.

torch_npu is imported only inside methods (never at module import): without Ascend's CANN libraries
importing it can break ``import torch`` itself, and this module must import on any machine.

Kernel signatures relied on (torch_npu API reference, hiascend.com "torch_npu.<op>" pages, PyTorch
adapter 6.0.RC3 / 7.0.0):
- ``npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd)``; gamma must have x's dtype.
- ``npu_rotary_mul(x, r1, r2)``: x*r1 + rotate_half(x)*r2 (the 'half' mode), 4-D x with r1/r2
  broadcast as S11D for SBND x; older releases require D == 128, B and N <= 1000.
- ``npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
  atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647, ...,
  sparse_mode=0, ...)`` returning a 7-tuple whose first element is the attention output. With
  sparse_mode=2 (leftUpCausal) the atten_mask is the compressed 2048x2048 upper-triangular bool
  mask (True = masked) and pre/next_tockens are ignored. key/value may have fewer heads (GQA).
- ``npu_grouped_matmul``: its schema changed between releases, so the installed one is read
  (``torch.ops.npu.npu_grouped_matmul.default._schema``) and called accordingly:
  * "tensor" form (op-plugin op_plugin_functions.yaml since 2025-09, commit 18c139a, and current
    master 517f2e7, 2026-08): ``..., Tensor? group_list=None, ..., int? split_item=0,
    int? group_type=None, int? group_list_type=0, ...``: group_list is an int64 device tensor,
    group_type=0 splits x on the M axis, group_list_type=0 makes group_list cumulative.
  * "ints" form (op-plugin 2024-06/07, commits 2368740 / b440388; torch_npu for PyTorch 2.1 of
    that time): ``..., int[]? group_list=None, int? split_item=0, ScalarType? output_dtype=None``:
    group_list is a host list of cumulative row counts, no group_type / group_list_type.
  * anything else: the reference loop (``reference_grouped_matmul``).
  In both forms one x [T, k] is split on M, one weight [k, n] per group, and split_item=2 asks for
  a single output tensor. The exact signatures are kept in tests/data/vendor_schemas.json and every
  call here is checked against them (tests/unit/test_vendor_schemas.py).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
from typing import Any, Optional

import torch

from megahet.backends.cpu import sdpa_causal_attention, torch_layer_norm
from megahet.device import GIB, Backend, datasheet_peak_flops
from megahet.errors import MegahetError
from megahet.kernels import (Kernels, TokenCounts, check_attention_shapes, expert_split_sizes,
                             reference_apply_rotary, reference_grouped_matmul, reference_rms_norm)

logger = logging.getLogger(__name__)

# Peak fp16/bf16 FLOP/s per Ascend device, by torch.npu.get_device_name(). Ascend 910: 256 TFLOPS
# fp16 (Huawei, Hot Chips 31, 2019). The 910B SKU figures are those commonly reported by Ascend
# cloud vendors; Huawei publishes no per-SKU datasheet we could cite, so set peak_tflops when MFU
# must be exact. fp32 is taken as half the fp16 peak.
_PEAK_TABLE = (
    ("Ascend910B1", 414e12),
    ("Ascend910B2", 376e12),
    ("Ascend910B3", 313e12),
    ("Ascend910B4", 280e12),
    ("Ascend910", 256e12),
)
_HALF = (torch.bfloat16, torch.float16)
_CAUSAL_MASK_SIZE = 2048  # npu_fusion_attention sparse_mode 2/3 takes this compressed mask
_MAX_GROUPS = 128  # npu_grouped_matmul accepts at most 128 tensors per list
_MASKS: dict[str, torch.Tensor] = {}


def _torch_npu() -> Any:
    """Import torch_npu (registers the 'npu' device and torch.npu); MegahetError when missing."""
    try:
        return importlib.import_module("torch_npu")
    except Exception as exc:
        raise MegahetError(f"the npu backend needs torch_npu ({exc}); install it on an Ascend host "
                           "with CANN (pip install megahet[npu])") from exc


def lookup_peak_flops(device_name: str, dtype: torch.dtype) -> Optional[float]:
    """Table peak for an Ascend device name ('Ascend910B3'), or None when not listed."""
    for key, half in _PEAK_TABLE:  # longest names first, so 'Ascend910' is the last resort
        if re.match(rf"{re.escape(key)}(?![A-Za-z0-9_])", device_name.strip()):
            if dtype in _HALF:
                return half
            return half / 2 if dtype == torch.float32 else None
    return None


def npu_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """torch_npu.npu_rms_norm when weight has x's dtype, else the reference."""
    if weight is None or weight.dtype != x.dtype:
        return reference_rms_norm(x, weight, eps)
    return _torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]  # [..., h]


def npu_apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """torch_npu.npu_rotary_mul on [s, b, n, d] with [s, 1, 1, d] tables, within documented limits."""
    s, b, n, d = x.shape
    if d != 128 or b > 1000 or n > 1000 or b * n > 1024:
        return reference_apply_rotary(x, cos, sin)
    x = x.contiguous()  # q/k are often strided slices of a fused qkv projection
    return _torch_npu().npu_rotary_mul(x, cos.to(x.dtype), sin.to(x.dtype))  # [s, b, n, d]


def _causal_mask(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _MASKS:
        size = _CAUSAL_MASK_SIZE
        _MASKS[key] = torch.ones(size, size, dtype=torch.bool, device=device).triu(diagonal=1)
    return _MASKS[key]


def npu_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         softmax_scale: Optional[float] = None) -> torch.Tensor:
    """torch_npu.npu_fusion_attention (BSND, leftUpCausal) for fp16/bf16, else SDPA."""
    d = q.shape[-1]
    if q.dtype not in _HALF or d % 16 != 0 or d > 512:
        return sdpa_causal_attention(q, k, v, softmax_scale)
    check_attention_shapes(q, k, v)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    # The op reads dense ND tensors; callers often pass transposed [s, b] views of [b, s] data.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = _torch_npu().npu_fusion_attention(
        q, k, v, q.shape[2], "BSND", atten_mask=_causal_mask(q.device), scale=scale,
        keep_prob=1.0, next_tockens=0, sparse_mode=2)
    return out[0]  # [b, s, nq, d]


def grouped_matmul_form(schema: str) -> Optional[str]:
    """"tensor", "ints" or None (use the loop) for an npu_grouped_matmul schema string (see above)."""
    params = re.search(r"\((.*)\)\s*->", schema)
    if params is None:
        return None
    args = {m.group(2): m.group(1) for m in re.finditer(r"([A-Za-z]+(?:\[\])?\??)\s+(\w+)", params.group(1))}
    group_list = args.get("group_list", "")
    if group_list.startswith("Tensor") and "group_type" in args and "group_list_type" in args:
        return "tensor"
    if group_list.startswith("int[]") and "group_type" not in args:
        return "ints"
    return None


def _installed_form() -> Optional[str]:
    try:
        op = getattr(torch.ops.npu, "npu_grouped_matmul")
        return grouped_matmul_form(str(op.default._schema))
    except Exception as exc:  # an op without the expected overload: the loop is always right
        logger.debug("npu_grouped_matmul schema unreadable: %s", exc)
        return None


def _call_grouped_matmul(form: str, x: torch.Tensor, weights: list, cumulative: list[int]) -> torch.Tensor:
    """One npu_grouped_matmul of x [T, k] split on M at `cumulative` row ends, one [k, n] weight per group."""
    npu = _torch_npu()
    if form == "tensor":
        group_list = torch.tensor(cumulative, dtype=torch.int64, device=x.device)  # [E]
        return npu.npu_grouped_matmul([x], weights, group_list=group_list, split_item=2, group_type=0,
                                      group_list_type=0)[0]  # [T, n]
    return npu.npu_grouped_matmul([x], weights, group_list=cumulative, split_item=2)[0]  # [T, n]


class _NpuGroupedMatmul(torch.autograd.Function):
    """Grouped matmul on the M axis; dx reuses the op with transposed weights, dW is per expert."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, sizes: list[int], form: str) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sizes, ctx.form = sizes, form
        ctx.cumulative = [sum(sizes[:i + 1]) for i in range(len(sizes))]
        return _call_grouped_matmul(form, x, list(weight.unbind(0)), ctx.cumulative)  # [T, n]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # [T, n]
        grad_x = _call_grouped_matmul(ctx.form, grad, [w.t() for w in weight.unbind(0)], ctx.cumulative)  # [T, k]
        grad_w = torch.stack([xe.t() @ ge for xe, ge in zip(x.split(ctx.sizes), grad.split(ctx.sizes))])
        return grad_x, grad_w, None, None  # grad_w [E, k, n]; zero for experts without tokens


def make_grouped_matmul(form: Optional[str]):
    """The grouped_matmul kernel for an npu_grouped_matmul form (None: the reference loop)."""

    def npu_grouped_matmul(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: TokenCounts) -> torch.Tensor:
        """torch_npu.npu_grouped_matmul for fp16/bf16 with <= 128 experts, else the loop."""
        sizes = expert_split_sizes(x, weight, tokens_per_expert)
        if (form is None or x.dtype not in _HALF or weight.dtype != x.dtype or len(sizes) > _MAX_GROUPS
                or x.shape[0] == 0):
            return reference_grouped_matmul(x, weight, sizes)
        return _NpuGroupedMatmul.apply(x.contiguous(), weight.contiguous(), sizes, form)

    return npu_grouped_matmul


class NPUBackend(Backend):
    """One Ascend NPU per rank (npu:local_rank) in the 'npu' domain, talking hccl.

    Args:
        peak_tflops: peak TFLOP/s per NPU; when unset, the table above, else a measured matmul.
    """

    name = "npu"
    device_type = "npu"
    collective_backend = "hccl"
    domain = "npu"
    # HcclAllReduce / HcclReduceScatter take int8/16/32/64, fp16, fp32 and bf16 on Atlas training,
    # A2 (910B) and A3 parts, not fp64 (CANN HCCL API reference, HcclAllReduce "dataType").
    unreducible_dtypes = frozenset({torch.float64})

    def is_available(self) -> tuple[bool, str]:
        try:
            spec = importlib.util.find_spec("torch_npu")
        except (ImportError, ValueError):  # a half-imported or stubbed module has no usable spec
            spec = None
        if spec is None and "torch_npu" not in sys.modules:
            return False, ("torch_npu is not installed (pip install megahet[npu] on an Ascend host "
                           "with CANN)")
        try:
            _torch_npu()
        except MegahetError as exc:
            return False, f"torch_npu failed to import: {exc.__cause__} (source CANN's set_env.sh)"
        if not torch.npu.is_available():
            return False, "no Ascend NPU visible (check the driver and ASCEND_RT_VISIBLE_DEVICES)"
        return True, ""

    def device(self, local_rank: int = 0) -> torch.device:
        """npu:local_rank, also made the current device: HCCL and the RNG calls use the current one."""
        _torch_npu()  # torch only knows the 'npu' device type once torch_npu is imported
        torch.npu.set_device(local_rank)
        return torch.device("npu", local_rank)

    def synchronize(self, device: Optional[torch.device] = None) -> None:
        _torch_npu()
        torch.npu.synchronize(device)

    def get_rng_state(self) -> torch.Tensor:
        _torch_npu()
        return torch.npu.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        _torch_npu()
        torch.npu.set_rng_state(state)

    def memory_stats(self, device: Optional[torch.device] = None) -> dict[str, float]:
        _torch_npu()
        return {"allocated_gb": torch.npu.memory_allocated(device) / GIB,
                "peak_gb": torch.npu.max_memory_allocated(device) / GIB}

    def reset_peak_memory(self) -> None:
        _torch_npu()
        torch.npu.reset_peak_memory_stats()

    def default_peak_flops(self, dtype: torch.dtype) -> float:
        _torch_npu()
        return datasheet_peak_flops(self, torch.npu.get_device_name(), dtype, lookup_peak_flops)

    def build_kernels(self) -> Kernels:
        _torch_npu()
        kernels = Kernels.reference().replace(
            rms_norm=npu_rms_norm, layer_norm=torch_layer_norm, apply_rotary=npu_apply_rotary,
            causal_attention=npu_causal_attention, grouped_matmul=make_grouped_matmul(_installed_form()))
        logger.info("npu kernels: %s", kernels.describe())
        return kernels
