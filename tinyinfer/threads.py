"""Thread counts: one per engine, applied in the thread that runs its work.

numba's thread count (``numba.set_num_threads``) belongs to the calling thread, so two engines
with different counts in one process keep theirs when each applies its own before a forward pass,
in the thread that runs it (kernels/parallel.py ``run_pass``: the main thread's passes run there,
those of other threads on the process's one pass thread).
"""

from __future__ import annotations

from typing import Optional


def resolve_threads(n_threads: Optional[int]) -> int:
    """``n_threads`` (None or <= 0: the performance cores, big.LITTLE aware, as llama.cpp's default),
    at most numba's pool."""
    import numba
    if n_threads and n_threads > 0:
        n = int(n_threads)
    else:
        from .sysinfo import performance_cores
        n = performance_cores()
    return max(1, min(n, numba.config.NUMBA_NUM_THREADS))


def use_threads(n: int) -> None:
    """Make numba's parallel kernels called from this thread use ``n`` threads."""
    import numba
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def set_threads(n_threads: Optional[int]) -> int:
    """resolve_threads + use_threads in this thread; returns the count."""
    n = resolve_threads(n_threads)
    use_threads(n)
    return n
