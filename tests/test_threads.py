"""Parallel kernels called from several Python threads under numba's workqueue layer.

Without libgomp (a minimal Raspberry Pi OS / Debian image) numba falls back to its
workqueue threading layer, which aborts the process when two threads enter parallel
regions at once (benchmarks/ARM.md). kernels/parallel.py serialises the regions there.
The check runs in a subprocess with the layer forced, so an abort fails the test
instead of killing pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys, threading
    import numba
    from tinyinfer.engine import Engine
    from tinyinfer.kernels import matmul as mm
    from tinyinfer.sampler import SamplerParams

    # every matmul takes the parallel driver
    with mm.using_config(mm.KernelConfig(parallel_min_bytes=1)):
        eng = Engine(sys.argv[1], n_ctx=128, n_batch=64, n_threads=2)
    assert numba.threading_layer() == "workqueue", numba.threading_layer()
    greedy = SamplerParams(temperature=0)
    ids = eng.tokenizer.encode("The capital of France is", special=True)
    ref = [s.token for s in eng.generate(ids, greedy, max_tokens=6)]
    engines = [eng.fork() for _ in range(3)]
    got, errors = [], []

    def run(e):
        try:
            for _ in range(2):
                e.reset()
                got.append([s.token for s in e.generate(ids, greedy, max_tokens=6)])
        except BaseException as exc:          # noqa: BLE001 - report it to the parent
            errors.append(repr(exc))

    ts = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert len(got) == 6 and all(g == ref for g in got), (ref, got)
    print("ok", numba.threading_layer(), ref)
""")


def test_engines_in_threads_under_workqueue(smollm2_path):
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(smollm2_path)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert r.stdout.startswith("ok workqueue")


SPIN = textwrap.dedent("""
    import os
    import numpy as np
    import tinyinfer.kernels                  # loads libgomp with a bounded spin (kernels/parallel.py)
    import numba

    @numba.njit(parallel=True)
    def f(a):
        for i in numba.prange(a.size):
            a[i] += 1.0

    f(np.zeros(1000))
    print(numba.threading_layer(), os.environ.get("GOMP_SPINCOUNT"))
""")


def _spin(env):
    """(threading layer, GOMP_SPINCOUNT left in the environment, the spin count libgomp itself reports
    under OMP_DISPLAY_ENV=verbose, or None)."""
    out = subprocess.run([sys.executable, "-c", SPIN], capture_output=True, text=True, check=True,
                         env=dict(env, OMP_DISPLAY_ENV="verbose"))
    layer, left = out.stdout.split()[-2:]
    told = [ln.split("=", 1)[1].strip().strip("'") for ln in out.stderr.splitlines()
            if ln.strip().startswith("GOMP_SPINCOUNT")]
    return layer, left, told[0] if told else None


def test_openmp_workers_spin_briefly_between_regions():
    """Under OpenMP, libgomp is loaded with GOMP_SPINCOUNT=30000: the workers of a region spin about a
    tenth as long when it ends as with libgomp's default of 300,000 (~0.2 against ~1.7 ms of CPU on the
    Xeon VM, taken from a server's other threads on a small machine). The setting is not left in the
    environment (child processes keep their defaults), and a user's own GOMP_SPINCOUNT is kept. libgomp
    reports what it read (OMP_DISPLAY_ENV=verbose): no timing, so a loaded machine cannot fail it."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["NUMBA_NUM_THREADS"] = "2"
    layer, left, told = _spin(env)
    if layer != "omp":
        return                                    # workqueue / tbb: no libgomp spinning to check
    assert (left, told) == ("None", "30000")
    env["GOMP_SPINCOUNT"] = "300000"              # libgomp's default, set by the user: kept
    assert _spin(env)[1:] == ("300000", "300000")
