"""Strict device checks for collectives: catch, on a CPU-only machine, host tensors bound for NCCL/HCCL.

On a GPU or NPU job a collective over a native group (nccl, hccl) fails at once if given a host
tensor, yet on CPU every tensor is a host tensor, so the gloo suite cannot see the bug. With
``MEGAHET_STRICT_DEVICES=1`` (the test suite sets it, see tests/conftest.py) every native group
treats its members as if they computed on an accelerator: a tensor created on the host without
naming a device (``torch.tensor([...])``, ``torch.zeros(n)``, ...), or moved there
(``.cpu()``, ``.to("cpu")``), and the results of a few shape-only ops on such tensors (cat, stack,
clone, dtype casts) are tagged, and ``CommGroup.check_devices`` rejects a tagged tensor. A tensor made
with ``device=ctx.device`` (or ``group.device``), or moved with ``.to(ctx.device)``, is not tagged.

Tagging is a ``TorchFunctionMode`` pushed once per process when the first strict group is built (it
adds a small Python cost to every torch call, so it is off outside tests). Bridged groups stage any
device through the host and are not checked.
"""
from __future__ import annotations

import os
import threading

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enabled", "activate", "is_host_tensor", "mark_host", "ENV"]

ENV = "MEGAHET_STRICT_DEVICES"
_TAG = "_megahet_host"
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.linspace, torch.randn, torch.rand, torch.randint, torch.eye}
_TO_HOST = {torch.Tensor.cpu}  # (torch.from_numpy does not pass through torch-function modes: mark_host)
_KEEP = {torch.cat, torch.stack, torch.Tensor.clone, torch.Tensor.float, torch.Tensor.double, torch.Tensor.long,
         torch.Tensor.int, torch.Tensor.contiguous, torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.unsqueeze,
         torch.Tensor.flatten, torch.Tensor.__getitem__, torch.Tensor.movedim, torch.movedim}
_state = threading.local()


def enabled() -> bool:
    """True when the environment asks for strict device checks."""
    return os.environ.get(ENV, "") == "1"


def is_host_tensor(tensor: torch.Tensor) -> bool:
    """True for a tensor tagged as created on, or moved to, the host without naming the device."""
    return getattr(tensor, _TAG, False)


def mark_host(tensor: torch.Tensor) -> torch.Tensor:
    """Tag a host tensor made where the mode cannot see it (torch.from_numpy), in strict mode only."""
    return _tag(tensor) if enabled() else tensor


def _tag(out):
    if isinstance(out, torch.Tensor):
        try:
            setattr(out, _TAG, True)
        except (AttributeError, RuntimeError):  # some tensor subclasses refuse attributes
            pass
    return out


def _any_host(args) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor) and getattr(a, _TAG, False):
            return True
        if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and getattr(t, _TAG, False) for t in a):
            return True
    return False


class _HostTagger(TorchFunctionMode):
    """Tags host-born tensors (see module docstring); every other call passes straight through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            device = kwargs.get("device")
            if device is None or device == "cpu":
                _tag(out)
        elif func in _TO_HOST:
            _tag(out)
        elif func is torch.Tensor.to:
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if target == "cpu":
                _tag(out)
            elif isinstance(target, (str, torch.device)):
                # Placed explicitly (e.g. .to(ctx.device)); on CPU .to() may return the tensor itself.
                if getattr(out, _TAG, False):
                    delattr(out, _TAG)
            elif _any_host(args[:1]):
                _tag(out)  # .to(dtype) keeps the tensor where it was
        elif func in _KEEP and _any_host(args):
            _tag(out)
        return out


def activate() -> None:
    """Push the tagging mode on this thread once (idempotent)."""
    if getattr(_state, "mode", None) is None:
        _state.mode = _HostTagger()
        _state.mode.__enter__()
