"""Host-memory allocator settings for CPU-backed ranks: stop glibc from unmapping and re-faulting.

glibc serves large blocks (above the mmap threshold: 128 KiB, growing up to 32 MiB) with mmap, unmaps
them on free, and trims the heap top past M_TRIM_THRESHOLD. A training step frees and re-allocates
the same activation and gradient sizes every step, so those pages are zero-filled by the kernel
again on every touch: thousands of minor page faults per step. `retain` keeps freed memory in the
process (M_MMAP_MAX=0: every block from the heap; M_TRIM_THRESHOLD at its maximum: never shrink),
the runtime equivalent of launching with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`.
Resident memory then stays at the step's peak instead of falling between steps.

Preloading another allocator (`LD_PRELOAD=libjemalloc.so.2` or `libtcmalloc_minimal.so.4`) is the
launcher-level alternative; `preloaded_allocator()` reports one when present.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("megahet")

HOST_ALLOCATOR_MODES = ("default", "retain")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_INT_MAX = 2 ** 31 - 1


def preloaded_allocator() -> str | None:
    """The jemalloc/tcmalloc library named in LD_PRELOAD, if any."""
    for lib in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if "jemalloc" in lib or "tcmalloc" in lib:
            return lib
    return None


def configure_host_allocator(mode: str) -> bool:
    """Apply --host-allocator `mode` to this process; True when glibc accepted the settings.

    `default` changes nothing. `retain` needs glibc (elsewhere, or with jemalloc/tcmalloc preloaded,
    it logs why and changes nothing). Call once per process, before the model is built.
    """
    if mode not in HOST_ALLOCATOR_MODES:
        from megahet.errors import MegahetError
        raise MegahetError(f"--host-allocator {mode!r} must be one of {list(HOST_ALLOCATOR_MODES)}")
    if mode == "default":
        return False
    other = preloaded_allocator()
    if other:
        log.info("host allocator: %s is preloaded; glibc settings not applied", other)
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.warning("host allocator: no glibc mallopt in %s; --host-allocator retain has no effect", name)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    if not ok:
        log.warning("host allocator: glibc refused the retain settings; allocation behaviour unchanged")
    return ok
