"""Backend interface and registry: the one place that knows which hardware a rank runs on.

Framework code asks its rank's ``Backend`` for the torch device, the collective library, RNG, memory,
peak FLOP/s and the kernel table, and never touches a vendor runtime (CUDA, Ascend) itself. Backends
are plugins found through the entry-point group ``megahet.backends`` (built-ins included), so a
vendor package can add one without patching megahet. Importing this module imports no vendor module
and does not initialise CUDA.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import resource
import sys
import time
from typing import Any, Callable, Optional

import torch

from megahet.errors import MegahetError
from megahet.kernels import Kernels

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "megahet.backends"
GIB = float(1024 ** 3)  # memory_stats reports GiB under the keys *_gb

_REGISTERED: dict[str, type["Backend"]] = {}  # register_backend() at run time; wins over entry points
_LOADED: dict[str, type["Backend"]] = {}  # classes already loaded from entry points
_MEASURED_FLOPS: dict[tuple[str, str], float] = {}  # (device, dtype) -> measured FLOP/s, per process


class Backend:
    """One rank's hardware: device, collectives, RNG, memory, peak FLOP/s and kernels.

    Subclasses set the class attributes and override what differs; the defaults here describe a
    host-memory device with reference kernels. Constructors must stay cheap and must not touch the
    device: the registry builds instances just to ask ``is_available()``.

    Args:
        peak_tflops: peak dense TFLOP/s per device used for MFU and planning; when None the backend
            uses its datasheet table or measures a matmul once per process.
    """

    name: str = "base"
    device_type: str = "cpu"
    collective_backend: str = "gloo"
    domain: str = "base"
    supports_bf16: bool = True  # False: stages on this backend compute in fp32 under --bf16 (masters are fp32 anyway)
    # dtypes its collective library cannot reduce: native groups reduce such tensors in fp32 instead
    unreducible_dtypes: frozenset = frozenset()

    def __init__(self, *, peak_tflops: Optional[float] = None) -> None:
        if peak_tflops is not None and (isinstance(peak_tflops, bool)
                                        or not isinstance(peak_tflops, (int, float))
                                        or peak_tflops <= 0):
            raise MegahetError(f"backend {self.name!r}: peak_tflops={peak_tflops!r} must be a positive "
                               "number (TFLOP/s per device) or left unset to measure it")
        self.peak_tflops = None if peak_tflops is None else float(peak_tflops)
        self._kernels: Optional[Kernels] = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, domain={self.domain!r}, "
                f"collective_backend={self.collective_backend!r})")

    # -- availability and placement ---------------------------------------------------------------
    def is_available(self) -> tuple[bool, str]:
        """(True, "") when this process can use the backend, else (False, why not)."""
        return True, ""

    def require_available(self) -> "Backend":
        """Return self, or raise MegahetError with the reason the backend cannot run here."""
        ok, reason = self.is_available()
        if not ok:
            usable = [d["name"] for d in describe_backends() if d["available"]]
            raise MegahetError(f"backend {self.name!r} is not available here: {reason}; pick one of "
                               f"{', '.join(usable) or 'none'} in the cluster spec or config")
        return self

    def device(self, local_rank: int = 0) -> torch.device:
        """The torch device this rank computes on."""
        return torch.device(self.device_type, local_rank)

    def synchronize(self, device: Optional[torch.device] = None) -> None:
        """Wait for queued work on the device (no-op for synchronous devices)."""

    # -- randomness -------------------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        """Seed the host generator and every device generator torch knows about."""
        torch.manual_seed(seed)

    def get_rng_state(self) -> torch.Tensor:
        """State (a CPU ByteTensor) of the generator this device's kernels draw from."""
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore a state from get_rng_state (activation recomputation, checkpoints)."""
        torch.set_rng_state(state)

    # -- memory and speed -------------------------------------------------------------------------
    def memory_stats(self, device: Optional[torch.device] = None) -> dict[str, float]:
        """{'allocated_gb', 'peak_gb'} in GiB; the default reports this process's host memory."""
        return host_memory_stats()

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window (best effort for host memory)."""
        reset_host_peak_memory()

    def peak_flops(self, dtype: torch.dtype) -> float:
        """Peak dense FLOP/s of one device in dtype: the peak_tflops option, else default_peak_flops."""
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise MegahetError(f"peak_flops needs a floating torch dtype, got {dtype!r}: pass e.g. "
                               "torch.bfloat16")
        if self.peak_tflops is not None:
            return self.peak_tflops * 1e12
        return self.default_peak_flops(dtype)

    def default_peak_flops(self, dtype: torch.dtype) -> float:
        """Backend's own estimate; the default measures a square matmul once per process."""
        return measure_matmul_flops(self, dtype)

    def set_tf32(self, enabled: bool) -> None:
        """Allow TF32 for fp32 matmuls (--tf32); a no-op where the device has no such mode."""

    def after_compute(self, elapsed_s: float) -> None:
        """Hook called after each measured compute chunk (the sim backend slows itself here)."""

    # -- kernels ----------------------------------------------------------------------------------
    @property
    def kernels(self) -> Kernels:
        """This backend's kernel table, built on first use (vendor imports happen only then)."""
        if self._kernels is None:
            self._kernels = self.build_kernels()
            logger.debug("backend %s kernels: %s", self.name, self._kernels.describe())
        return self._kernels

    def build_kernels(self) -> Kernels:
        """Override to swap fused kernels into the reference table."""
        return Kernels.reference()


# -- host memory and FLOP/s helpers shared by backends ----------------------------------------------
def host_memory_stats() -> dict[str, float]:
    """Resident (VmRSS) and peak resident (VmHWM) memory of this process in GiB."""
    current = peak = None
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    current = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    if peak is None:
        # ru_maxrss is KiB on Linux and bytes on macOS.
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss if sys.platform == "darwin" else maxrss * 1024
    if current is None:
        current = peak
    return {"allocated_gb": current / GIB, "peak_gb": peak / GIB}


def reset_host_peak_memory() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        logger.debug("cannot reset peak host memory; peak_gb stays the process-lifetime peak")
        return False


def _time_matmul(backend: Backend, a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    start = time.perf_counter()
    torch.matmul(a, b)
    backend.synchronize(device)
    return time.perf_counter() - start


def measure_matmul_flops(backend: Backend, dtype: torch.dtype, max_size: int = 1024,
                         seconds: float = 0.2) -> float:
    """Achieved FLOP/s of square matmuls on this rank's device, measured once per process.

    The size doubles from 128 up to max_size while one matmul stays well under the time budget, so
    a dtype without a fast path (fp16 on many CPUs) is measured small instead of taking seconds.
    """
    device = backend.device(int(os.environ.get("LOCAL_RANK", "0") or 0))  # torchrun sets LOCAL_RANK
    key = (str(device), str(dtype))
    if key in _MEASURED_FLOPS:
        return _MEASURED_FLOPS[key]
    size = 128
    # A private generator: how many sizes are tried depends on timing, and the job's RNG state (saved in
    # checkpoints) must not.
    gen = torch.Generator().manual_seed(0)
    while True:
        a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)  # [size, size]
        b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)  # [size, size]
        _time_matmul(backend, a, b, device)  # first call at a size pays allocation and dispatch
        one = _time_matmul(backend, a, b, device)
        if size >= max_size or one * 16 > seconds:
            break
        size *= 2
    count, elapsed = 0, 0.0
    while elapsed < seconds:
        elapsed += _time_matmul(backend, a, b, device)
        count += 1
    _MEASURED_FLOPS[key] = 2.0 * size ** 3 * count / elapsed
    logger.info("measured %.3g TFLOP/s for %s %dx%d matmul on %s", _MEASURED_FLOPS[key] / 1e12,
                dtype, size, size, device)
    return _MEASURED_FLOPS[key]


def datasheet_peak_flops(backend: Backend, device_name: str, dtype: torch.dtype,
                         lookup: Callable[[str, torch.dtype], Optional[float]]) -> float:
    """`lookup`'s table peak for the device, else (with a warning) a measured matmul."""
    peak = lookup(device_name, dtype)
    if peak is None:
        logger.warning("no datasheet peak for %s in %s; measuring a matmul (set peak_tflops to override)",
                       device_name, dtype)
        peak = measure_matmul_flops(backend, dtype, max_size=8192)
    return peak


# -- registry -----------------------------------------------------------------------------------------
def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def registered_backends() -> list[str]:
    """Names of every backend: installed entry points plus run-time registrations."""
    return sorted(set(_entry_points()) | set(_REGISTERED))


def register_backend(name: str, cls: type[Backend]) -> None:
    """Register (or replace) a backend class at run time, e.g. in tests or notebooks."""
    if not isinstance(name, str) or not name.isidentifier():
        raise MegahetError(f"backend name {name!r} must be a Python identifier such as 'mygpu'")
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise MegahetError(f"register_backend({name!r}, ...) needs a subclass of megahet.device.Backend,"
                           f" got {cls!r}")
    _REGISTERED[name] = cls
    _LOADED.pop(name, None)


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass registered under name (entry points are loaded once and cached)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _LOADED:
        return _LOADED[name]
    entry = _entry_points().get(name)
    if entry is None:
        raise MegahetError(f"unknown backend {name!r}; registered backends: "
                           f"{', '.join(registered_backends()) or 'none'} (install the plugin that "
                           f"provides it under entry-point group {ENTRY_POINT_GROUP!r})")
    try:
        cls = entry.load()
    except Exception as exc:  # a broken plugin must not hide the others
        raise MegahetError(f"backend {name!r} failed to load from {entry.value!r}: {exc}; reinstall "
                           "the package that provides it") from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise MegahetError(f"entry point {name!r} = {entry.value!r} is not a megahet.device.Backend "
                           "subclass; fix the plugin's entry point")
    _LOADED[name] = cls
    return cls


def _check_options(name: str, cls: type[Backend], options: dict[str, Any]) -> None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise MegahetError(f"backend {name!r} has no option(s) {', '.join(unknown)}; its options are: "
                           f"{', '.join(accepted) or 'none'}")


def get_backend(name: str, **options: Any) -> Backend:
    """Build the backend registered under name with its options (e.g. speed=0.5 for sim).

    Does not check availability: call ``.require_available()`` on the result before using a device.
    """
    cls = backend_class(name)
    _check_options(name, cls, options)
    return cls(**options)


def describe_backends() -> list[dict[str, Any]]:
    """[{'name', 'available', 'reason'}] for every registered backend, for diagnostics."""
    rows = []
    for name in registered_backends():
        try:
            ok, reason = backend_class(name)().is_available()
        except Exception as exc:  # report, never raise: this runs when something is already wrong
            ok, reason = False, f"failed to load: {exc}"
        rows.append({"name": name, "available": bool(ok), "reason": reason})
    return rows


def default_backend_name() -> str:
    """First available of cuda, npu, cpu: the backend for a one-process job that names none."""
    for name in ("cuda", "npu"):
        try:
            if backend_class(name)().is_available()[0]:
                return name
        except MegahetError:
            continue
    return "cpu"
