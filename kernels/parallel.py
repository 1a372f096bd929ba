"""Calling numba's parallel regions from several Python threads.

numba runs ``parallel=True`` code on one of three threading layers: OpenMP (needs
``libgomp.so.1``), TBB, or its own fallback, *workqueue*. Workqueue is not
thread-safe: a second thread entering a parallel region while one runs aborts the
whole process (``Terminating: Nested parallel kernel launch detected``). A minimal
Debian / Raspberry Pi OS image without ``libgomp1`` gets workqueue (benchmarks/ARM.md).

Every call of a parallel kernel goes through :func:`call`. Under workqueue (and
before the layer is known: numba picks it at the first launch) it holds one
process-wide lock for the region; under omp or tbb it is a plain call. Serial
kernels never take it, so threads still overlap outside the parallel regions.

Under OpenMP, :func:`tune_waits` (at the package's import) bounds how long a region's workers spin
when it ends before they sleep: ``GOMP_SPINCOUNT=30000`` (0.2 ms of worker CPU after a region on the
Xeon VM) instead of libgomp's 300,000 (1.7 ms there). A process holds one team per thread that
launches regions (each server slot that leads a forward pass has its own worker); on a machine whose
cores are all taken (a server with its HTTP thread, its slots and a load generator on two vCPUs) the
long spins took the cores from the thread the step waited for: ``profile_step.py --batch 4 -t 2``
under load 11 on the 2-vCPU VM, 555 ms a step with libgomp's default, 84 with 10,000 polls, 45
passive. Passive (sleep at once) is no default: every region then pays a futex wake, and single-
stream decode at ``-t 2`` fell to about half (SmolLM2 Q4_0 tg, benchmarks/RESULTS.md, issue 26),
while 30,000 polls kept it (the gaps between a decode step's regions are tens of us). The setting is
in the environment only while numba loads libgomp (which reads it then): child processes
(llama.cpp's tools started by the benchmarks) keep their own defaults.
"""

from __future__ import annotations

import os
import threading

_LOCK = threading.RLock()
_safe = False          # True once the layer is known to be re-entrant (omp, tbb)


def _learn() -> None:
    global _safe
    import numba
    try:
        _safe = numba.threading_layer() != "workqueue"
    except ValueError:           # no parallel region has run yet
        pass


def call(fn, *args):
    """``fn(*args)`` for a ``parallel=True`` jitted ``fn``, safe from any thread."""
    if _safe:
        return fn(*args)
    with _LOCK:
        try:
            return fn(*args)
        finally:
            _learn()


def serialized() -> bool:
    """True when parallel regions take the lock (workqueue, or no region has run yet)."""
    return not _safe


def num_threads() -> int:
    """numba.get_num_threads() without its per-call launch check (2 us -> 0.2 us): it is read once
    per matmul and attention call of every token."""
    global num_threads
    import numba
    numba.get_num_threads()              # launches the threading layer once
    try:
        from numba.np.ufunc.parallel import _get_num_threads as fast
        fast()
    except Exception:                    # pragma: no cover - private API moved
        fast = numba.get_num_threads
    num_threads = fast
    return fast()


SPIN_COUNT = "30000"


def tune_waits() -> None:
    """Load numba's threading layer with ``GOMP_SPINCOUNT=SPIN_COUNT`` unless the user set
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (see the module docstring), then take it out of the
    environment again."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    try:
        from numba.np.ufunc.parallel import _launch_threads
        _launch_threads()                # libgomp reads its environment when it is loaded
    except Exception:                    # pragma: no cover - private API moved: left to numba's first launch
        return
    del os.environ["GOMP_SPINCOUNT"]
