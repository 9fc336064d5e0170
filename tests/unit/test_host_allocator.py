"""--host-allocator retain: freed host memory is reused instead of faulted back in (glibc)."""
import subprocess
import sys

import pytest

from megahet.errors import MegahetError
from megahet.host_allocator import configure_host_allocator

PROBE = """
import resource, sys, torch
from megahet.host_allocator import configure_host_allocator
applied = configure_host_allocator(sys.argv[1])
for _ in range(20):  # settle the heap (the first blocks grow and re-align it)
    x = torch.ones(16 << 20)  # 64 MiB: above glibc's largest mmap threshold
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(16 << 20)  # touched: every page of a fresh mapping faults
    del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retain_stops_the_refaulting_of_freed_blocks():
    applied, retained = _faults("retain")
    _, default = _faults("default")
    assert applied
    assert default > 10 * 16000 * 0.9  # 10 x 64 MiB of 4 KiB pages, faulted again each time
    assert retained < default / 10


def test_unknown_mode_names_the_flag():
    with pytest.raises(MegahetError, match="--host-allocator"):
        configure_host_allocator("jemalloc")
    assert configure_host_allocator("default") is False
