"""glibc's malloc settings for the forward pass's temporaries.

A forward pass allocates its activations afresh (numpy arrays of up to tens of MiB for a prompt
chunk) and frees them at its end. glibc serves blocks above its mmap threshold with fresh mappings
whose pages fault in on first touch, on every pass; with several threads their page faults contend.
That threshold moves with the history of the process (freeing a mapped block raises it), so the same
pass ran at 1x or 1.5x the time depending on what the process had done before (SmolLM2, a 128-token
pass on 2 threads after a 1-thread run: 65 or 100 ms; benchmarks/RESULTS.md). A fixed threshold of
32 MiB (glibc's ceiling for the moving one) and a trim threshold above it keep those blocks in the
heap, reused from pass to pass. Linux with glibc only; ``MALLOC_MMAP_THRESHOLD_`` in the environment
(glibc's own knob) wins.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20


def tune() -> bool:
    """Set the thresholds once (True when glibc took them)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):       # not glibc (musl has none or a stub)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
