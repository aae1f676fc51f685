"""The driver returns freed heap to the OS between stages (slm.heap): a glibc process that
freed most of its small allocations, with one live allocation above them, keeps them resident
until ``malloc_trim``."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
from slm.heap import release_free_heap

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024

chunks = [bytes(1000) + bytes([i % 256]) for i in range(150_000)]  # ~150 MB of 1 KB mallocs
top = bytes(1000) + b"pin"  # allocated above them: the heap cannot shrink from its top
del chunks
freed = rss_mb()
trimmed = release_free_heap()
print(trimmed, freed, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_goes_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    trimmed, freed, after = out[0] == "True", float(out[1]), float(out[2])
    assert trimmed
    assert freed - after > 100, (freed, after)  # ~150 MB freed but resident, then returned
