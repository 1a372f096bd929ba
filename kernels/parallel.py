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
Xeon VM) instead of libgomp's 300,000 (1.7 ms there). On a machine whose cores are all taken (a
server with its HTTP thread, its slots and a load generator on two vCPUs) the long spins took the
cores from the thread the step waited for: ``profile_step.py --batch 4 -t 2`` under load 11 on the
2-vCPU VM, 555 ms a step with libgomp's default, 84 with 10,000 polls, 45 passive. Passive (sleep at
once) is no default: every region then pays a futex wake, and single-stream decode at ``-t 2`` fell
to about half (SmolLM2 Q4_0 tg, benchmarks/RESULTS.md, issue 26), while 30,000 polls kept it (the
gaps between a decode step's regions are tens of us). The setting is in the environment only while
numba loads libgomp (which reads it then): child processes (llama.cpp's tools started by the
benchmarks) keep their own defaults.

**One thread launches the regions.** libgomp gives every thread that launches a region a team of its
own, and once its teams hold more threads than the machine has CPUs it stops spinning altogether
(its "throttled" spin count, 100 polls): every region then sleeps and wakes its workers. On the
2-vCPU VM a tiny region cost 2 us from a process's one launching thread and 55-62 us as soon as a
second team lived (kept by a thread that is still alive), and a server had one team per slot
thread that ever led a pass: a ``--parallel 4`` decode pass of SmolLM2 took 20 ms instead of 14
(121 regions a pass). So :func:`run_pass` runs a forward pass of more than one thread on the
calling thread only if that is the main thread (a script, the CLI), and otherwise on the one *pass
thread* of the process, which it starts on first use: every other thread (server slots, a model
loading in the background, a library caller's worker threads) hands its passes there and waits
(a round trip costs ~60 us across the VM's two vCPUs, against 20 ms a pass). A process whose main
thread and other threads both run passes of several threads still gets two teams (slower, not wrong).
"""

from __future__ import annotations

import _thread
import contextvars
import os
import queue
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


# -- the pass thread: the one thread besides the main thread that launches regions (module docstring)
_pass_queue: "queue.SimpleQueue | None" = None
_pass_ident = None
_pass_start = threading.Lock()


def _pass_loop(q) -> None:
    global _pass_ident
    _pass_ident = threading.get_ident()
    while True:
        fn, box, done = q.get()
        try:
            box.append(fn())
        except BaseException as e:          # raised again in the caller's thread
            box.append(e)
            box.append(None)
        finally:
            done.release()


def _set_threads(n: int) -> None:
    import numba
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def on_pass_thread() -> bool:
    """True in the thread that :func:`run_pass` hands other threads' passes to."""
    return threading.get_ident() == _pass_ident


def run_pass(n_threads: int, fn, *args, **kw):
    """``fn(*args, **kw)``, a forward pass whose parallel regions use ``n_threads`` threads (numba's
    count belongs to a thread: set here, where the pass runs). On the calling thread when it is the
    main thread or the pass thread, or with one thread (no region launches); otherwise on the pass
    thread, which the caller waits for (the caller's context variables go along: the kernel config
    of a lazy prepare). Exceptions reach the caller."""
    global _pass_queue
    if n_threads <= 1 or threading.get_ident() == _pass_ident or threading.current_thread() is threading.main_thread():
        _set_threads(n_threads)
        return fn(*args, **kw)
    if _pass_queue is None:
        with _pass_start:
            if _pass_queue is None:
                q = queue.SimpleQueue()
                threading.Thread(target=_pass_loop, args=(q,), name="tinyinfer-pass", daemon=True).start()
                _pass_queue = q
    ctx = contextvars.copy_context()

    def job():
        _set_threads(n_threads)
        return ctx.run(fn, *args, **kw)

    box: list = []
    done = _thread.allocate_lock()
    done.acquire()
    _pass_queue.put((job, box, done))
    done.acquire()
    if len(box) == 2:
        raise box[0]
    return box[0]
