"""Measure a process's allocated host memory around an operation (tests and benchmarks, Linux).

RssAnon counts anonymous resident pages: what the process allocated, not file pages it maps (a
safetensors file read through mmap is page cache, not an allocation). glibc keeps freed blocks below
its dynamic mmap threshold in the heap; `exact_malloc_accounting` fixes the threshold so large blocks
are returned at free and RssAnon follows the live allocations.
"""
from __future__ import annotations

import ctypes
import threading
import time


def rss_anon() -> int:
    """Anonymous resident memory of this process, in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def exact_malloc_accounting() -> None:
    """Give every block >= 64 KiB its own mapping and trim freed heap tops at once (glibc mallopt)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixing it also turns off the dynamic threshold)
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD


class PeakSampler:
    """`with PeakSampler() as s: ...` samples RssAnon every 0.5 ms in a thread; `s.peak - s.start` is the
    extra memory the block needed at its peak."""

    def __enter__(self):
        self.start = self.peak = rss_anon()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss_anon())

    @property
    def extra(self) -> int:
        return self.peak - self.start
