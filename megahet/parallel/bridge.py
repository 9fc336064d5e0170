"""Host-staged transport between communication domains that share no collective library.

A tensor crossing vendors goes device -> host -> gloo -> host -> device. Reductions are staged in
fp32 (gloo's half-precision reductions are not reliable, pytorch issue 111131). Results are always
written back into the caller's tensor with `copy_`, never by rebinding a local (`.to()` returns a new
tensor, and losing it silently drops the reduced value), and the device is checked after the trip.
"""
from __future__ import annotations

import torch

_HALF = (torch.bfloat16, torch.float16)


def stage(tensor: torch.Tensor, bridged: bool) -> torch.Tensor:
    """Host copy for a bridged group; the tensor itself otherwise."""
    if bridged and tensor.device.type != "cpu":
        return tensor.detach().to("cpu")
    return tensor


def stage_for_reduction(tensor: torch.Tensor, bridged: bool, upcast: bool) -> torch.Tensor:
    """Like `stage`, and in fp32 when the library cannot be trusted to reduce half types."""
    staged = stage(tensor, bridged)
    if upcast and staged.dtype in _HALF:
        staged = staged.float()
    return staged


def write_back(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Copy a staged result into the caller's tensor, keeping the caller's device and dtype."""
    device = dst.device
    with torch.no_grad():
        dst.copy_(src)
    assert dst.device == device, f"bridge result landed on {dst.device}, expected {device}"
    return dst


def unstage(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Bring a host result back to the compute device."""
    out = tensor.to(device=device, dtype=dtype)
    assert out.device.type == torch.device(device).type, f"bridge result on {out.device}, expected {device}"
    return out
